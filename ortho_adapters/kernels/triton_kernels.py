"""Triton kernels of the fused frozen-factor linear layer ``y = x W^T + b + s ((x A^T) M^T) B^T``.

Three kernels, every matmul accumulating in fp32:

* :func:`_lowrank_in_kernel` -- ``u = x A^T`` and ``v = s mix(u)`` (``mix(u) = u M^T``, ``u * m`` or ``u``)
  in one pass over ``x`` (the small ``T x n`` by ``n x r`` GEMM, ``M`` applied in its epilogue).
* :func:`_mm_lowrank_kernel` -- ``C = X W^T (+ bias) + V Bf^T``: a tiled GEMM whose epilogue adds the rank-r
  product. Forward: ``y = x W^T + b + v B^T``; backward: ``dx = dy W + du A`` (strides give the
  transposes, nothing is copied).
* :func:`_dy_pass_kernel` -- one pass over ``dy``: ``g = s dy B``, ``du = mix^T(g)``, and the small gradients
  ``dB = s dy^T mix(u)`` and ``dM = g^T u`` (matrix) / ``sum(g * u)`` (vector), reduced over row blocks with
  fp32 atomics (so their summation order, and last bits, vary between runs).

Importing this module imports Triton; :mod:`ortho_adapters.kernels.function` does so lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# M's form: no middle factor (identity), a diagonal given as a vector, or an r x r matrix.
MIX_NONE, MIX_VECTOR, MIX_MATRIX = 0, 1, 2


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter.

    Fixed at import: Triton's own ``tl`` helpers and this module's kernels are interpreted functions
    only if ``TRITON_INTERPRET=1`` was set before ``import triton``, and it must stay set while they run.
    """
    return INTERPRETED


def rank_block(r: int) -> int:
    """Padded rank held in registers: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(r))


def emulate(dtype: torch.dtype) -> bool:
    """Whether the kernels work around the interpreter's bf16 bugs (half-precision data under it)."""
    return interpreting() and dtype != torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s fp32 input precision, following ``torch.backends.cuda.matmul.allow_tf32``."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ``EMULATE`` (interpreter with bf16 / fp16 data only) works around two bugs of Triton 3.9's interpreter so
# that it computes what the GPU computes: it multiplies bf16 blocks in ``tl.dot`` as their raw uint16 bits,
# and it casts fp32 to bf16 by truncation where the GPU rounds to nearest even.


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """``a @ b (+ acc)`` accumulated in fp32. ``EMULATE`` widens the blocks to fp32 first: products of
    bf16 / fp16 values are exact in fp32, so this is the GPU's half-precision MMA with fp32 accumulation."""
    if EMULATE:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _to(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even; ``EMULATE`` rounds fp32 -> bf16 by hand (see above)."""
    if EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mix(
    u,
    m_ptr,
    stride_m0,
    stride_m1,
    r,
    R_PAD: tl.constexpr,
    MIX: tl.constexpr,
    PREC: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """``u M^T`` (MIX=2), ``u * m`` (MIX=1) or ``u`` (MIX=0) for a (rows, R_PAD) block ``u``; fp32 result.

    Called with ``stride_m0`` and ``stride_m1`` swapped it computes the adjoint ``u M``.
    """
    offs_r = tl.arange(0, R_PAD)
    if MIX == 2:
        offs_c = tl.arange(0, R_PAD)
        # (M^T)[k, j] = M[j, k]
        mt = tl.load(
            m_ptr + offs_r[:, None] * stride_m1 + offs_c[None, :] * stride_m0,
            mask=(offs_r[:, None] < r) & (offs_c[None, :] < r),
            other=0.0,
        )
        out = _dot(u, mt, None, PREC, EMULATE)
    elif MIX == 1:
        mv = tl.load(m_ptr + offs_r * stride_m0, mask=offs_r < r, other=0.0)
        out = u.to(tl.float32) * mv.to(tl.float32)[None, :]
    else:
        out = u.to(tl.float32)
    return out


@triton.jit
def _lowrank_in_kernel(
    x_ptr, a_ptr, m_ptr, u_ptr, v_ptr,
    T, K, r, scaling,
    stride_xt, stride_xk, stride_ar, stride_ak, stride_m0, stride_m1,
    stride_ut, stride_ur, stride_vt, stride_vr,
    MIX: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """Row block of ``u = x A^T`` (stored) and ``v = s mix(u)`` (stored), both in the output dtype."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + kk[None, :] * stride_xk,
            mask=(offs_t[:, None] < T) & (kk[None, :] < K),
            other=0.0,
        )
        at = tl.load(  # (A^T)[k, j] = A[j, k]
            a_ptr + kk[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=(kk[:, None] < K) & (offs_r[None, :] < r),
            other=0.0,
        )
        acc = _dot(x, at, acc, PREC, EMULATE)
    out_ty = u_ptr.dtype.element_ty
    u = _to(acc, out_ty, EMULATE)
    mask = (offs_t[:, None] < T) & (offs_r[None, :] < r)
    tl.store(u_ptr + offs_t[:, None] * stride_ut + offs_r[None, :] * stride_ur, u, mask=mask)
    v = _mix(u, m_ptr, stride_m0, stride_m1, r, R_PAD, MIX, PREC, EMULATE)
    v = v * scaling
    tl.store(
        v_ptr + offs_t[:, None] * stride_vt + offs_r[None, :] * stride_vr, _to(v, out_ty, EMULATE), mask=mask
    )


@triton.jit
def _mm_lowrank_kernel(
    x_ptr, w_ptr, bias_ptr, v_ptr, bf_ptr, c_ptr,
    M, N, K, r,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_vm, stride_vr, stride_bn, stride_br,
    stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """Tile of ``C = X W^T + bias + V Bf^T`` (X: M x K, W: N x K, V: M x r, Bf: N x r), fp32 accumulation."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n  # grouped ordering: programs that share X rows run together (L2 reuse)
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        wt = tl.load(
            w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=(kk[:, None] < K) & (offs_n[None, :] < N),
            other=0.0,
        )
        acc = _dot(x, wt, acc, PREC, EMULATE)
    if HAS_LOWRANK:  # epilogue: + V Bf^T, an extra K = r step on the same accumulator
        offs_r = tl.arange(0, R_PAD)
        v = tl.load(
            v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr,
            mask=(offs_m[:, None] < M) & (offs_r[None, :] < r),
            other=0.0,
        )
        bft = tl.load(
            bf_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=(offs_r[:, None] < r) & (offs_n[None, :] < N),
            other=0.0,
        )
        acc = _dot(v, bft, acc, PREC, EMULATE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        _to(acc, c_ptr.dtype.element_ty, EMULATE),
        mask=mask,
    )


@triton.jit
def _dy_pass_kernel(
    dy_ptr, b_ptr, u_ptr, m_ptr, du_ptr, db_ptr, dm_ptr,
    T, N, r, scaling,
    stride_dyt, stride_dyn, stride_bn, stride_br, stride_ut, stride_ur, stride_m0, stride_m1,
    stride_dut, stride_dur,
    MIX: tl.constexpr, NEED_B: tl.constexpr, NEED_M: tl.constexpr, NEED_U: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    EMULATE: tl.constexpr,
):  # fmt: skip
    """One pass over a row block of ``dy``: ``g = s dy B``, ``du = mix^T(g)``, atomic ``dB``, ``dM`` parts."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, R_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = offs_t < T
    tr_mask = row_mask[:, None] & (offs_r[None, :] < r)
    in_ty = dy_ptr.dtype.element_ty
    u = tl.load(u_ptr + offs_t[:, None] * stride_ut + offs_r[None, :] * stride_ur, mask=tr_mask, other=0.0)
    if NEED_B:  # w = mix(u) in the input dtype, as the forward applied it
        w = _to(_mix(u, m_ptr, stride_m0, stride_m1, r, R_PAD, MIX, PREC, EMULATE), in_ty, EMULATE)
    g = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + offs_n
        dy = tl.load(
            dy_ptr + offs_t[:, None] * stride_dyt + nn[None, :] * stride_dyn,
            mask=row_mask[:, None] & (nn[None, :] < N),
            other=0.0,
        )
        b = tl.load(
            b_ptr + nn[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=(nn[:, None] < N) & (offs_r[None, :] < r),
            other=0.0,
        )
        g = _dot(dy, b, g, PREC, EMULATE)
        if NEED_B:  # dB[n, :] += s dy[:, n]^T w
            part = _dot(tl.trans(dy), w, None, PREC, EMULATE) * scaling
            tl.atomic_add(
                db_ptr + nn[:, None] * R_PAD + offs_r[None, :],
                part,
                mask=(nn[:, None] < N) & (offs_r[None, :] < r),
            )
    g = _to(g * scaling, in_ty, EMULATE)  # grad of v = s mix(u), rounded like the reference's (dy @ B) * s
    if NEED_M:
        if MIX == 2:  # dM = g^T u
            part = _dot(tl.trans(g), u, None, PREC, EMULATE)
            tl.atomic_add(
                dm_ptr + offs_r[:, None] * R_PAD + offs_r[None, :],
                part,
                mask=(offs_r[:, None] < r) & (offs_r[None, :] < r),
            )
        else:  # dm = sum_t g * u
            part = tl.sum(g.to(tl.float32) * u.to(tl.float32), axis=0)
            tl.atomic_add(dm_ptr + offs_r, part, mask=offs_r < r)
    if NEED_U:
        # the adjoint g M is _mix with M's strides swapped (a vector's two strides are equal)
        du = _mix(g, m_ptr, stride_m1, stride_m0, r, R_PAD, MIX, PREC, EMULATE)
        tl.store(
            du_ptr + offs_t[:, None] * stride_dut + offs_r[None, :] * stride_dur,
            _to(du, in_ty, EMULATE),
            mask=tr_mask,
        )


INTERPRETED = isinstance(_mm_lowrank_kernel, InterpretedFunction)

# Block sizes: fixed small tiles under the interpreter (no autotuning: it would run every config), a few
# Hopper/Ampere-friendly configs on a GPU.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in (
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 32, 5, 2),
    )
]
_mm_lowrank_tuned = triton.autotune(configs=_GEMM_CONFIGS, key=["M", "N", "K", "R_PAD", "PREC"])(
    _mm_lowrank_kernel
)
_INTERPRETER_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}


def lowrank_in(
    x: torch.Tensor, a: torch.Tensor, m: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, v) = (x A^T, s mix(x A^T))`` for a 2-D ``x`` (T x n), both T x r in ``x``'s dtype."""
    t, k = x.shape
    r = a.shape[0]
    u = torch.empty(t, r, device=x.device, dtype=x.dtype)
    v = torch.empty_like(u)
    mix, m_arg, m_strides = _mix_args(m, a)
    block_t = 32 if interpreting() else 64
    block_k = 64
    _lowrank_in_kernel[(triton.cdiv(t, block_t),)](
        x, a, m_arg, u, v,
        t, k, r, float(scaling),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), *m_strides,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        MIX=mix, R_PAD=rank_block(r), BLOCK_T=block_t, BLOCK_K=block_k,
        PREC=dot_precision(x.dtype), EMULATE=emulate(x.dtype),
    )  # fmt: skip
    return u, v


def mm_lowrank(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    v: torch.Tensor | None,
    bf: torch.Tensor | None,
) -> torch.Tensor:
    """``X W^T (+ bias) (+ V Bf^T)`` with ``X`` (M x K), ``W`` (N x K), ``V`` (M x r), ``Bf`` (N x r).

    Any strides (transposed views included); the result is a new contiguous M x N tensor in ``X``'s dtype.
    """
    mm, k = x.shape
    n = w.shape[0]
    c = torch.empty(mm, n, device=x.device, dtype=x.dtype)
    has_lr = v is not None
    r = v.shape[1] if has_lr else 1
    v_arg, bf_arg = (v, bf) if has_lr else (x, w)
    v_strides = (v.stride(0), v.stride(1), bf.stride(0), bf.stride(1)) if has_lr else (0, 0, 0, 0)
    args = (
        x, w, bias if bias is not None else x, v_arg, bf_arg, c,
        mm, n, k, r,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), *v_strides,
        c.stride(0), c.stride(1),
    )  # fmt: skip
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_LOWRANK=has_lr,
        R_PAD=rank_block(r),
        PREC=dot_precision(x.dtype),
        EMULATE=emulate(x.dtype),
    )
    if interpreting():
        cfg = _INTERPRETER_GEMM
        grid = (triton.cdiv(mm, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _mm_lowrank_kernel[grid](*args, **flags, **cfg)
    else:

        def grid(meta):
            return (triton.cdiv(mm, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _mm_lowrank_tuned[grid](*args, **flags)
    return c


def dy_pass(
    dy: torch.Tensor,
    b: torch.Tensor,
    u: torch.Tensor,
    m: torch.Tensor | None,
    scaling: float,
    need_b: bool,
    need_m: bool,
    need_u: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over ``dy`` (T x N): ``(du, dB, dM)`` (each ``None`` unless asked for).

    ``du = mix^T(s dy B)`` (T x r, ``dy``'s dtype); ``dB = s dy^T mix(u)`` (N x r) and ``dM`` (r x r or r)
    are accumulated in fp32.
    """
    t, n = dy.shape
    r = u.shape[1]
    r_pad = rank_block(r)
    mix, m_arg, m_strides = _mix_args(m, u)
    f32 = dict(device=dy.device, dtype=torch.float32)
    du = torch.empty(t, r, device=dy.device, dtype=dy.dtype) if need_u else None
    db = torch.zeros(n, r_pad, **f32) if need_b else None
    dm_shape = (r_pad, r_pad) if mix == MIX_MATRIX else (r_pad,)
    dm = torch.zeros(dm_shape, **f32) if need_m else None
    block_t = 32 if interpreting() else 64
    block_n = 64
    _dy_pass_kernel[(triton.cdiv(t, block_t),)](
        dy, b, u, m_arg, du if need_u else u, db if need_b else u, dm if need_m else u,
        t, n, r, float(scaling),
        dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), u.stride(0), u.stride(1), *m_strides,
        du.stride(0) if need_u else 0, du.stride(1) if need_u else 0,
        MIX=mix, NEED_B=need_b, NEED_M=need_m, NEED_U=need_u,
        R_PAD=r_pad, BLOCK_T=block_t, BLOCK_N=block_n,
        PREC=dot_precision(dy.dtype), EMULATE=emulate(dy.dtype),
    )  # fmt: skip
    if db is not None:
        db = db[:, :r]
    if dm is not None:
        dm = dm[:r, :r] if mix == MIX_MATRIX else dm[:r]
    return du, db, dm


def _mix_args(m: torch.Tensor | None, fallback: torch.Tensor) -> tuple[int, torch.Tensor, tuple[int, int]]:
    """``(MIX, pointer, strides)`` for a middle factor (``fallback``: a dummy pointer for ``None``)."""
    if m is None:
        return MIX_NONE, fallback, (0, 0)
    if m.dim() == 1:
        return MIX_VECTOR, m, (m.stride(0), m.stride(0))  # equal: _mix's adjoint swaps them
    return MIX_MATRIX, m, (m.stride(0), m.stride(1))
