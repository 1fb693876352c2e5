"""Autograd function of the fused frozen-factor linear layer.

``y = x W^T + bias + s ((x A^T) M^T) B^T`` with frozen ``W`` and ``A``; ``M`` an r x r matrix (LoRA-SB),
an r vector meaning ``diag(M)`` (LoLDU) or ``None`` meaning identity (FedSVD). Forward: two kernels,
``u = x A^T`` with ``v = s u M^T`` in one pass over ``x``, then the base GEMM with ``v B^T`` in its
epilogue. Backward: one pass over ``dy`` for ``dB``, ``dM`` and ``du = s (dy B) M``, then
``dx = dy W + du A`` as one GEMM with the rank-r term in its epilogue. Only ``u`` (T x r) is saved.

Precision follows :mod:`ortho_adapters.core.precision` and PyTorch's ``F.linear``: under
``torch.autocast`` every operand is cast to the autocast dtype, otherwise to ``x``'s dtype; all products
accumulate in fp32. Gradients of ``M``, ``B`` and ``bias`` are accumulated in fp32 and returned in their
tensors' own dtypes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..core.precision import compute_dtype
from .availability import MAX_RANK, SUPPORTED_DTYPES


class FusedFrozenFactorLinear(torch.autograd.Function):
    """Fused ``x W^T + bias + s ((x A^T) M^T) B^T``; saves ``u = x A^T`` and the (unchanged) factors."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, m, b, scaling: float, dtype: torch.dtype):  # noqa: D102
        from . import triton_kernels as tk

        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a_c, m_c, b_c = a.to(dtype), None if m is None else m.to(dtype), b.to(dtype)
        u, v = tk.lowrank_in(x2, a_c, m_c, scaling)
        y = tk.mm_lowrank(x2, weight.to(dtype), None if bias is None else bias.to(dtype), v, b_c)
        ctx.save_for_backward(u, weight, a, m, b)
        ctx.scaling, ctx.dtype, ctx.x_shape = scaling, dtype, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # noqa: D102
        from . import triton_kernels as tk

        u, weight, a, m, b = ctx.saved_tensors
        need_x, _, need_bias, _, need_m, need_b, _, _ = ctx.needs_input_grad
        dtype = ctx.dtype
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        m_c = None if m is None else m.to(dtype)
        grad_x = grad_bias = grad_m = grad_b = None
        if need_x or need_m or need_b:
            du, grad_b, grad_m = tk.dy_pass(dy, b.to(dtype), u, m_c, ctx.scaling, need_b, need_m, need_x)
            if need_x:  # dx = dy W + du A: W^T and A^T as strided views, no copies
                grad_x = tk.mm_lowrank(dy, weight.to(dtype).t(), None, du, a.to(dtype).t())
                grad_x = grad_x.reshape(ctx.x_shape)
        if need_bias:
            grad_bias = dy.sum(0, dtype=torch.float32)
        return grad_x, None, grad_bias, None, grad_m, grad_b, None, None


def _check(x, weight, bias, a, m, b) -> None:
    """Raise ``ValueError`` naming the first operand whose shape or role does not fit."""
    out_f, in_f = weight.shape if weight.dim() == 2 else (None, None)
    if weight.dim() != 2 or x.shape[-1] != in_f:
        raise ValueError(
            f"weight must be (out, in) with in = x.shape[-1]={x.shape[-1]}, got {tuple(weight.shape)}"
        )
    r = a.shape[0] if a.dim() == 2 else 0
    if a.dim() != 2 or a.shape[1] != in_f or r == 0:
        raise ValueError(f"a must be (r, {in_f}), got {tuple(a.shape)}")
    if tuple(b.shape) != (out_f, r):
        raise ValueError(f"b must be ({out_f}, {r}), got {tuple(b.shape)}")
    if m is not None and tuple(m.shape) not in ((r, r), (r,)):
        raise ValueError(f"m must be None, ({r},) or ({r}, {r}), got {tuple(m.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must be ({out_f},), got {tuple(bias.shape)}")
    if r > MAX_RANK:
        raise ValueError(f"rank {r} exceeds the fused kernels' limit of {MAX_RANK}")
    if torch.is_grad_enabled() and (weight.requires_grad or a.requires_grad):
        raise ValueError("weight and a must be frozen (requires_grad=False) for the fused kernels")


def fused_frozen_factor_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    a: torch.Tensor,
    m: Optional[torch.Tensor],
    b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x W^T + bias + s ((x A^T) M^T) B^T`` with the Triton kernels (the layer's full output).

    ``x`` (..., n); ``weight`` (m, n) and ``a`` (r, n) frozen; ``b`` (m, r); ``m``: (r, r), (r,) = diagonal,
    or ``None`` = identity; ``bias`` (m,) or ``None``. Gradients flow to ``x``, ``bias``, ``m`` and ``b``.
    Runs on CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``). Output dtype: the autocast dtype
    under ``torch.autocast``, else ``x.dtype``.
    """
    _check(x, weight, bias, a, m, b)
    if x.device.type != "cuda":
        from . import triton_kernels

        if not triton_kernels.interpreting():
            raise ValueError(
                f"the fused kernels run on CUDA tensors (got {x.device}); on CPU only when Triton was "
                "imported with TRITON_INTERPRET=1"
            )
    dtype = compute_dtype(x, x.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused kernels support {SUPPORTED_DTYPES}, got {dtype}")
    return FusedFrozenFactorLinear.apply(x, weight, bias, a, m, b, float(scaling), dtype)
