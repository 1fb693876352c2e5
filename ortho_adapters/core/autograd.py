"""Autograd function for the frozen-factor low-rank family (LoRA-XS / LoRA-SB, LoLDU, FedSVD clients).

``y = s * ((x A^T) M^T) B^T`` with ``A`` (r x n) frozen. Backward needs only ``u = x A^T`` (T x r)
besides the small factors, so unlike eager PyTorch (which keeps ``x``, T x n) the layer's extra
activation memory is T x r. ``M`` (r x r) or ``B`` (m x r) may require grad; ``M=None`` means identity.
"""

from __future__ import annotations

from typing import Optional

import torch


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class FrozenFactorProduct(torch.autograd.Function):
    """``y = s * ((x A^T) M^T) B^T``; saves ``u = x A^T`` for backward, never ``x``."""

    @staticmethod
    def forward(ctx, x, a, m, b, scaling: float):  # noqa: D102
        u = x @ a.t()
        v = u if m is None else u @ m.t()
        y = (v @ b.t()) * scaling
        ctx.save_for_backward(u, a, m, b)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        u, a, m, b = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, need_m, need_b, _ = ctx.needs_input_grad
        grad_x = grad_m = grad_b = None
        grad_v = (grad_y @ b) * s
        if need_b:
            v = u if m is None else u @ m.t()
            grad_b = _flat(grad_y).t() @ _flat(v) * s
        if need_m:
            grad_m = _flat(grad_v).t() @ _flat(u)
        if need_x:
            grad_u = grad_v if m is None else grad_v @ m
            grad_x = grad_u @ a
        return grad_x, None, grad_m, grad_b, None


def frozen_factor_product(
    x: torch.Tensor, a: torch.Tensor, m: Optional[torch.Tensor], b: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """Compute ``s * ((x A^T) M^T) B^T`` saving only ``x A^T`` for backward (see module doc)."""
    return FrozenFactorProduct.apply(x, a, m, b, scaling)
