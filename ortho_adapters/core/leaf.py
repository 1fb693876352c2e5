"""Trainable leaf modules of the frozen-factor family.

Each holds the only trainable tensor of one adapter on one layer and is called in forward, which
is what FSDP's flattening (uniform ``requires_grad`` per wrapped module) needs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .autograd import frozen_factor_product


class MixingMatrix(nn.Module):
    """Trainable ``R`` (r x r) between frozen ``B`` and ``A``: ``y = s ((x A^T)(R - R0)^T) B^T``."""

    def __init__(self, r: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(r, r))

    def matrix(self, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``R - R0`` (or ``R`` when there is no offset)."""
        return self.weight if offset is None else self.weight - offset

    def forward(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        offset: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return frozen_factor_product(x, a, self.matrix(offset), b, scaling)
