"""Whether a tuner layer's forward goes through the fused kernel, and the call when it does.

A layer takes the fused path when all of these hold (otherwise the PyTorch path runs, unchanged):

* the layer's method exposes its update as frozen factors (:meth:`OrthoLayer.frozen_factors`);
* ``kernels_available(x.device, dtype)``: CUDA, Triton installed, fp32 / bf16 / fp16, and the
  ``ORTHO_ADAPTERS_DISABLE_KERNELS`` environment variable unset; not while ``torch.compile`` traces;
* exactly one active adapter, unmerged, with ``use_kernels=True`` in its config and no active dropout;
* a plain ``nn.Linear`` / ``Conv1D`` base (not quantized) with a frozen weight on ``x``'s device, called
  with ``x`` alone, in the dtype ``F.linear`` would run in (``x``'s, or the autocast dtype);
* rank at most :data:`MAX_RANK`, and no hooks on the base layer or the adapter's trainable leaf (FSDP2,
  Opacus and Accelerate's offloading hooks need those modules' own forward).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from ..core.precision import compute_dtype
from .availability import MAX_RANK, kernels_available
from .function import fused_frozen_factor_linear


class FusedCall(NamedTuple):
    """Arguments of :func:`fused_frozen_factor_linear` for one layer call."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    a: torch.Tensor
    m: Optional[torch.Tensor]
    b: torch.Tensor
    scaling: float


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or hasattr(module, "_hf_hook")
    )


def plan_fused(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Optional[FusedCall]:
    """The fused call for ``layer(x, *args, **kwargs)``, or ``None`` when the PyTorch path must run."""
    if torch.compiler.is_compiling() or args or kwargs:
        return None
    dtype = compute_dtype(x, x.dtype)
    if not kernels_available(x.device, dtype):
        return None
    if layer.quantization_backend is not None or layer.merged or layer.disable_adapters:
        return None
    names = layer.active_adapter_names()
    if len(names) != 1:
        return None
    name = names[0]
    if not getattr(layer, "use_kernels", {}).get(name, True):
        return None
    dropout = layer.adapter_dropout[name]
    if not isinstance(dropout, nn.Identity) and dropout.training:
        return None
    factors = layer.frozen_factors(name)
    if factors is None:
        return None
    base = layer.get_base_layer()
    if _has_hooks(base) or _has_hooks(layer.trainable_modules[name]):
        return None
    weight = base.weight
    if weight.requires_grad or weight.device != x.device or weight.dtype not in (x.dtype, dtype):
        return None
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != weight.dtype:
        return None  # F.linear would refuse the mix: let the PyTorch path raise its own error
    a, m, b, scaling = factors
    if a.requires_grad or a.shape[0] > MAX_RANK or any(t.device != x.device for t in (a, b)):
        return None
    bias = getattr(base, "bias", None)
    return FusedCall(weight.t() if layer.fan_in_fan_out else weight, bias, a, m, b, scaling)


def fused_forward(
    layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]
) -> Optional[torch.Tensor]:
    """The layer's full output from the fused kernel, or ``None`` when :func:`plan_fused` says no."""
    call = plan_fused(layer, x, args, kwargs)
    if call is None:
        return None
    return fused_frozen_factor_linear(x, *call)
