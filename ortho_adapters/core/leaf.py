"""Trainable leaf modules of the frozen-factor family.

Each holds the only trainable tensor of one adapter on one layer and is called in forward, which
is what FSDP's flattening (uniform ``requires_grad`` per wrapped module) needs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .autograd import frozen_factor_product


class FrozenFactorLeaf(nn.Module):
    """Base of the leaves: ``y = s' ((x A^T) M^T) B^T`` with ``(M, s')`` from :meth:`middle`."""

    def middle(self, scaling: float, offset: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
        """The middle factor ``M`` (r x r matrix, or r vector for a diagonal) and the scaling to apply."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        offset: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        m, s = self.middle(scaling, offset)
        return frozen_factor_product(x, a, m, b, s)


class MixingMatrix(FrozenFactorLeaf):
    """Trainable ``R`` (r x r) between frozen ``B`` and ``A``: ``y = s ((x A^T)(R - R0)^T) B^T``.

    Created from its initial value (never assigned through ``.data`` later), so that PEFT's
    ``low_cpu_mem_usage`` can create it on the meta device and fill it from a state dict.
    """

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(initial.detach().clone().contiguous())

    def middle(self, scaling: float, offset: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
        """``(R - R0, s)`` (``R`` when there is no offset)."""
        return (self.weight if offset is None else self.weight - offset), scaling


class DiagonalScale(FrozenFactorLeaf):
    """LoLDU's trainable diagonal ``z`` (r values) and optional scalar ``sigma`` between frozen ``B``, ``A``.

    Frozen sigma (``sigma=None``): ``y = s ((x A^T) * (z - z0)) B^T``.
    Trainable sigma (initialized at ``s``): ``y = ((x A^T) * (sigma z - s z0)) B^T``, equal at the start.
    """

    def __init__(self, z: torch.Tensor, sigma: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(z.detach().clone().contiguous())
        if sigma is None:
            self.register_parameter("sigma", None)
        else:
            self.sigma = nn.Parameter(torch.tensor(float(sigma)))

    def middle(self, scaling: float, offset: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
        """``(m, s)`` such that the update is ``s * B diag(m) A``."""
        if self.sigma is None:
            return (self.weight if offset is None else self.weight - offset), scaling
        m = self.sigma * self.weight
        return (m if offset is None else m - scaling * offset), 1.0
