"""O3's orthogonality penalty between the current request's ``A_t`` and earlier requests' ``A_i``.

``P = mean_layers sum_{i<t} ||A_i A_t^T||_F^2`` (arXiv 2407.10223, Eq. of the orthogonal LoRA); the
training loss of request ``t`` is ``CE + lambda * P``. ``P = 0`` for the first request.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layer import O3Layer


def o3_layers(model: nn.Module, adapter_name: str) -> list[O3Layer]:
    """The O3 layers of ``model`` that hold ``adapter_name``."""
    return [m for m in model.modules() if isinstance(m, O3Layer) and adapter_name in m.o3_lora]


def orthogonality_penalty(model: nn.Module, adapter_name: Optional[str] = None) -> torch.Tensor:
    """``mean_layers sum_{i<t} ||A_i A_t^T||_F^2`` (differentiable in the current ``A_t``).

    Args:
        model: a PEFT model (or any module) containing :class:`O3Layer` s.
        adapter_name: the O3 adapter (default: the model's active adapter).
    """
    if adapter_name is None:
        adapter_name = (
            model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        )
    layers = o3_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"model has no O3 layer with adapter {adapter_name!r}")
    terms = []
    for layer in layers:
        frozen_a, _ = layer.request_stacks(adapter_name)
        a_t = layer.o3_lora[adapter_name].lora_A.weight
        if frozen_a is None:
            terms.append(a_t.sum() * 0.0)
            continue
        products = frozen_a.to(a_t.dtype) @ a_t.t()  # (k, r, r): A_i A_t^T for every earlier request i
        terms.append(products.pow(2).sum())
    return torch.stack(terms).mean()
