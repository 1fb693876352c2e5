"""Truncated LDU factors of a weight from LU with partial pivoting (LoLDU, arXiv 2410.13618, Sec. 3).

``W0 = P L U`` (fp32, LAPACK ``getrf`` through ``torch.linalg.lu_factor_ex``), ``D = diag(U)``,
``U <- D^-1 U`` so ``W0 = P L D U`` with unit-diagonal ``L`` and ``U``. The first ``r`` factors are
kept: ``PL_r = P L[:, :r]`` (m x r), ``U_r = U[:r]`` (r x n), ``d_r = D[:r]``. ``PL_r diag(d_r) U_r``
is exactly the part of ``W0`` removed by the first ``r`` elimination steps: ``W0`` minus it vanishes
on the ``r`` pivot rows and on the first ``r`` columns, and it equals ``W0`` for ``r = min(m, n)``.
The dense ``m x m`` permutation ``P`` is never formed: its rows are applied by indexing.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch


class LDUFactors(NamedTuple):
    """``PL_r`` (m x r), unit-diagonal ``U_r`` (r x n), pivots ``d_r`` (r) and LAPACK's row swaps."""

    pl_r: torch.Tensor
    u_r: torch.Tensor
    d_r: torch.Tensor
    pivots: torch.Tensor


def pivots_to_permutation(pivots: torch.Tensor, m: int) -> torch.Tensor:
    """Row order ``perm`` with ``P^T W = W[perm]`` from LAPACK's 1-based sequential row swaps."""
    perm = list(range(m))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    return torch.tensor(perm, dtype=torch.long, device=pivots.device)


def ldu_factors(weight: torch.Tensor, r: int) -> LDUFactors:
    """fp32 truncated LDU factors of ``weight`` (m x n): ``PL_r diag(d_r) U_r`` is its rank-r LDU part.

    A zero pivot (the rest of its column is already eliminated) gets ``d_i = 1`` and keeps its ``U`` row
    unscaled, so ``PL_r diag(d_r) U_r`` stays exact for rank-deficient weights.
    """
    m, n = weight.shape
    if not 0 < r <= min(m, n):
        raise ValueError(f"LDU rank {r} must be in [1, {min(m, n)}] for a {m} x {n} weight")
    lu, pivots, _ = torch.linalg.lu_factor_ex(weight.to(torch.float32))
    eye = torch.eye(m, r, dtype=lu.dtype, device=lu.device)
    l_r = torch.tril(lu[:, :r], diagonal=-1) + eye
    pl_r = torch.empty_like(l_r)
    pl_r[pivots_to_permutation(pivots, m)] = l_r  # (P M)[perm] = M for P = I[:, perm]
    u_r = torch.triu(lu[:r])
    d_r = torch.diagonal(u_r).clone()
    d_r = torch.where(d_r.abs() > torch.finfo(torch.float32).tiny, d_r, torch.ones_like(d_r))
    return LDUFactors(pl_r.contiguous(), (u_r / d_r[:, None]).contiguous(), d_r, pivots)


def truncated_ldu(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(PL_r, U_r, d_r)`` of :func:`ldu_factors`."""
    return ldu_factors(weight, r)[:3]


FINGERPRINT_BYTES = 64


def fingerprint(weight: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """64 bytes (uint8): SHA-256 of the fp32 base weight, then SHA-256 of the LU row swaps.

    The factors ``PL_r``, ``U_r`` are a deterministic function of both: equal fingerprints at load mean the
    rebuilt factors are the saved adapter's (bit-identical on the same machine and LAPACK).
    """
    weight_bytes = weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    pivot_bytes = pivots.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    digest = hashlib.sha256(weight_bytes).digest() + hashlib.sha256(pivot_bytes).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()
