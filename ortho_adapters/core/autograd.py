"""Autograd function for the frozen-factor low-rank family (LoRA-XS / LoRA-SB, LoLDU, FedSVD clients).

``y = s * ((x A^T) M^T) B^T`` with ``A`` (r x n) frozen. Backward needs only ``u = x A^T`` (T x r)
besides the small factors, so unlike eager PyTorch (which keeps ``x``, T x n) the layer's extra
activation memory is T x r. ``M`` (r x r) or ``B`` (m x r) may require grad; ``M=None`` means identity
and a vector ``M`` (r) means ``diag(M)`` (LoLDU), applied elementwise at ``O(T r)`` cost.

Under ``torch.autocast`` the forward's matmuls run in the autocast dtype (``u`` is saved in it) and the
backward re-enters the same autocast region, so its matmuls do too; gradients are returned to the
parameters' own (fp32) dtype by autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from .precision import autocast_state, reenter_autocast


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _mix(u: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """``u M^T`` for a matrix ``M``, ``u diag(M)`` for a vector, ``u`` for ``None``."""
    if m is None:
        return u
    return u * m if m.dim() == 1 else u @ m.t()


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t * s``, skipping the pass over ``t`` for ``s == 1`` (LoRA-SB's and LoLDU's default)."""
    return t if s == 1 else t * s


class FrozenFactorProduct(torch.autograd.Function):
    """``y = s * ((x A^T) M^T) B^T``; saves ``u = x A^T`` for backward, never ``x``."""

    @staticmethod
    def forward(ctx, x, a, m, b, scaling: float):  # noqa: D102
        u = x @ a.t()
        y = _scaled(_mix(u, m), scaling) @ b.t()  # scale the T x r intermediate, not the T x m output
        ctx.save_for_backward(u, a, m, b)
        ctx.scaling = scaling
        ctx.autocast = autocast_state(x)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        with reenter_autocast(ctx.autocast):
            return FrozenFactorProduct._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        u, a, m, b = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, need_m, need_b, _ = ctx.needs_input_grad
        grad_x = grad_m = grad_b = None
        grad_v = _scaled(grad_y @ b, s)
        if need_b:
            grad_b = _scaled(_flat(grad_y).t() @ _flat(_mix(u, m)), s)
        if need_m:
            if m.dim() == 1:  # elementwise ops do not autocast: multiply in the matmuls' dtype
                grad_m = (_flat(grad_v) * _flat(u).to(grad_v.dtype)).sum(0)
            else:
                grad_m = _flat(grad_v).t() @ _flat(u)
        if need_x:
            if m is None:
                grad_u = grad_v
            else:
                grad_u = grad_v * m if m.dim() == 1 else grad_v @ m
            grad_x = grad_u @ a
        return grad_x, None, grad_m, grad_b, None


def frozen_factor_product(
    x: torch.Tensor, a: torch.Tensor, m: Optional[torch.Tensor], b: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """Compute ``s * ((x A^T) M^T) B^T`` (vector ``M``: ``diag(M)``) saving only ``x A^T`` for backward."""
    return FrozenFactorProduct.apply(x, a, m, b, scaling)
