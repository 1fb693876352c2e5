"""O-LoRA's regularizer (Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning",
EMNLP Findings 2023, arXiv 2310.14152) and a ``Trainer`` that adds it to the loss.

``penalty = l1 * sum_layers sum_ij |(A_old A_t^T)_ij| + l2 * sum_layers (||A_t||_F + ||B_t||_F)``

``A_old`` stacks every earlier task's ``A`` (so the first term sums over old tasks too), ``A_t`` / ``B_t``
are the current task's factors. In subspace mode orthogonality is structural and the penalty is zero.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.trainer import PenaltyTrainer
from .lifecycle import resolve


def olora_penalty(
    model: nn.Module,
    adapter_name: Optional[str] = None,
    l1: Optional[float] = None,
    l2: Optional[float] = None,
) -> torch.Tensor:
    """O-LoRA's penalty for the current task (a differentiable scalar; add it to the task loss).

    ``l1`` / ``l2`` default to the adapter's config. Returns ``0`` for a subspace-mode adapter.
    """
    adapter_name, config, layers = resolve(model, adapter_name)
    l1 = config.l1 if l1 is None else l1
    l2 = config.l2 if l2 is None else l2
    device = next(iter(layers.values())).ortho_lora_B[adapter_name].weight.device
    total = torch.zeros((), device=device)
    if config.mode != "olora":
        return total
    for layer in layers.values():
        a_t = layer.ortho_lora_A[adapter_name].weight
        if l1 and adapter_name in layer.ortho_lora_A_old:
            a_old = layer.ortho_lora_A_old[adapter_name].to(a_t.dtype)
            total = total + l1 * (a_old @ a_t.t()).abs().sum()
        if l2:
            total = total + l2 * (
                torch.linalg.norm(a_t) + torch.linalg.norm(layer.ortho_lora_B[adapter_name].weight)
            )
    return total


class OrthoLoraTrainer(PenaltyTrainer):
    """``transformers.Trainer`` whose training loss includes :func:`olora_penalty` (zero in subspace mode)."""

    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        return olora_penalty(model) if model.training else None
