"""HUT's two execution paths for ``y = x (W0 ⊙ M)^T + bias``, ``M = 1 + s B A`` (arXiv 2409.13501).

``W0`` is the frozen (m x n) base weight, ``B`` (m x r) and ``A`` (r x n) the trainable factors, ``T`` the
number of tokens.

* **materialize** (:func:`hadamard_linear`): form ``W' = W0 ⊙ (1 + s B A)`` once per call (``m n r``
  multiply-adds, independent of ``T``) and run ONE GEMM. Backward recomputes ``W'`` (``m n r``) instead of
  saving an (m x n) matrix per layer; it needs the weight gradient ``G = dy^T x`` (``T m n``, as in full
  fine-tuning), then ``dM = G ⊙ W0``, ``dB = s dM A^T``, ``dA = s B^T dM``. With ``include_base=False``
  it computes only the update ``x (W0 ⊙ s B A)^T`` (used when input dropout is active).
* **factored** (:func:`factored_update`): ``x (W0 ⊙ s B A)^T = s sum_i B[:, i] ⊙ ((x ⊙ A[i]) W0^T)``, the
  ``r`` GEMMs with ``W0`` batched as one GEMM over ``T r`` rows, added to the base layer's output.

:func:`path_costs` counts the multiply-adds of both; ``execution="auto"`` takes the cheaper one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def hadamard_multiplier(b: torch.Tensor, a: torch.Tensor, scaling: float, include_base: bool = True):
    """fp32 ``1 + s B A`` (or ``s B A`` with ``include_base=False``)."""
    update = (b.float() @ a.float()) * scaling
    return update + 1.0 if include_base else update


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class HadamardLinear(torch.autograd.Function):
    """``y = x (W0 ⊙ M)^T + bias`` in one GEMM in ``dtype``; ``M`` fp32, recomputed in backward.

    Both GEMMs of the backward also run in ``dtype`` (under autocast: the autocast dtype); the saved input
    is ``x`` in ``dtype`` (no copy when it already is).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, b, a, scaling: float, include_base: bool, dtype: torch.dtype):  # noqa: D102
        weight = (w0.float() * hadamard_multiplier(b, a, scaling, include_base)).to(dtype)
        x = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, weight, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, w0, b, a)
        ctx.scaling, ctx.include_base, ctx.dtype = scaling, include_base, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x, w0, b, a = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w0, need_bias, need_b, need_a = ctx.needs_input_grad[:5]
        grad_x = grad_w0 = grad_bias = grad_b = grad_a = None
        multiplier = hadamard_multiplier(b, a, s, ctx.include_base)
        w0_32 = w0.float()
        dtype = ctx.dtype
        grad_y = grad_y.to(dtype)
        if need_x:
            grad_x = grad_y @ (w0_32 * multiplier).to(dtype)
        if need_w0 or need_b or need_a:
            grad_weight = (_flat(grad_y).t() @ _flat(x).to(dtype)).float()  # dy^T x, (m x n)
            if need_w0:
                grad_w0 = (grad_weight * multiplier).to(w0.dtype)
            if need_b or need_a:
                grad_m = grad_weight * w0_32
                if need_b:
                    grad_b = (grad_m @ a.float().t() * s).to(b.dtype)
                if need_a:
                    grad_a = (b.float().t() @ grad_m * s).to(a.dtype)
        if need_bias and ctx.bias_dtype is not None:
            grad_bias = _flat(grad_y).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w0, grad_bias, grad_b, grad_a, None, None, None


def hadamard_linear(
    x: torch.Tensor,
    w0: torch.Tensor,
    bias: Optional[torch.Tensor],
    b: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    include_base: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Materialized path: ``x (W0 ⊙ (1 + s B A))^T + bias`` (``include_base=False``: ``x (W0 ⊙ s B A)^T``).

    ``w0`` is the (out, in) base weight in any float dtype; ``M`` and ``W0 ⊙ M`` are formed in fp32 and the
    GEMM runs in ``dtype`` (default ``w0.dtype``). Saves ``x`` for backward, never ``W'``.
    """
    return HadamardLinear.apply(x, w0, bias, b, a, scaling, include_base, dtype or w0.dtype)


def factored_update(
    x: torch.Tensor, w0: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Factored path: ``x (W0 ⊙ s B A)^T = s sum_i B[:, i] ⊙ ((x ⊙ A[i]) W0^T)`` (plain autograd).

    Runs in ``x``'s dtype (the factors and ``W0`` are cast to it); the ``r`` products with ``W0`` run as one
    GEMM over ``T r`` rows.
    """
    dtype = x.dtype
    u = x.unsqueeze(-2) * a.to(dtype)  # (..., r, n)
    v = u @ w0.to(dtype).t()  # (..., r, m)
    return (v * b.to(dtype).t()).sum(-2) * scaling


def path_costs(
    tokens: int,
    out_features: int,
    in_features: int,
    r: int,
    grad_input: bool,
    grad_factors: bool,
    dropout: bool = False,
) -> dict[str, int]:
    """Multiply-adds of one forward (+ backward if a gradient is needed) of each path.

    With ``mn = m n``:

    * materialize: forward ``mn (r + 1) + T mn``; backward recomputes ``W'`` (``mn (r + 1)``) and adds
      ``T mn`` for ``dx`` and ``T mn + mn (2 r + 1)`` for ``dB, dA``. With active dropout the base layer's
      own GEMM runs too: ``+ T mn`` (``+ T mn`` more for its ``dx``).
    * factored: forward ``(r + 1) T mn + T r (m + n)``; backward ``T mn`` for the base's ``dx`` and
      ``r T mn + T r (m + n)`` for the adapter's ``dx`` / ``dA`` / ``dB``.

    Training (``dx`` and factor gradients, no dropout) at ``r = 8``: materialize ``3 T mn + 35 mn``,
    factored ``~18 T mn``, so factored wins only for ``T <= 2``; inference: only for ``T = 1``.
    """
    t, m, n = tokens, out_features, in_features
    mn = m * n
    backward = grad_input or grad_factors
    materialize = mn * (r + 1) + t * mn
    factored = (r + 1) * t * mn + t * r * (m + n)
    if backward:
        materialize += mn * (r + 1) + grad_input * t * mn + grad_factors * (t * mn + mn * (2 * r + 1))
        factored += grad_input * t * mn + r * t * mn + t * r * (m + n)
    if dropout:
        materialize += t * mn * (1 + grad_input)
    return {"materialize": materialize, "factored": factored}


def choose_path(costs: dict[str, int]) -> str:
    """The path with fewer multiply-adds in a :func:`path_costs` result (ties: materialize)."""
    return "factored" if costs["factored"] < costs["materialize"] else "materialize"
