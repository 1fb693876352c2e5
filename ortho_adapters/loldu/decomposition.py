"""Truncated LDU factors of a weight from LU with partial pivoting (LoLDU, arXiv 2410.13618, Sec. 3).

``W0 = P L U`` (fp32, LAPACK ``getrf`` through ``torch.linalg.lu_factor_ex``), ``D = diag(U)``,
``U <- D^-1 U`` so ``W0 = P L D U`` with unit-diagonal ``L`` and ``U``. The first ``r`` factors are
kept: ``PL_r = P L[:, :r]`` (m x r), ``U_r = U[:r]`` (r x n), ``d_r = D[:r]``. ``PL_r diag(d_r) U_r``
is exactly the part of ``W0`` removed by the first ``r`` elimination steps: ``W0`` minus it vanishes
on the ``r`` pivot rows and on the first ``r`` columns, and it equals ``W0`` for ``r = min(m, n)``.
The dense ``m x m`` permutation ``P`` is never formed: its rows are applied by indexing.
"""

from __future__ import annotations

import torch


def pivots_to_permutation(pivots: torch.Tensor, m: int) -> torch.Tensor:
    """Row order ``perm`` with ``P^T W = W[perm]`` from LAPACK's 1-based sequential row swaps."""
    perm = list(range(m))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    return torch.tensor(perm, dtype=torch.long, device=pivots.device)


def truncated_ldu(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(PL_r, U_r, d_r)`` of ``weight`` (m x n): ``PL_r diag(d_r) U_r`` is its rank-r LDU part.

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
    return pl_r.contiguous(), (u_r / d_r[:, None]).contiguous(), d_r
