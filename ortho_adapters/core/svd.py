"""fp32 truncated SVD helpers shared by the SVD-based methods."""

from __future__ import annotations

from typing import Optional

import torch

from .finite import check_finite


def truncated_svd(
    matrix: torch.Tensor,
    r: int,
    *,
    step: str = "truncated_svd",
    statistic: str = "input matrix",
    layer: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors ``(U_r, S_r, Vh_r)`` of ``matrix`` (Eckart-Young), computed in fp32.

    The SVD runs on the matrix's own device; nothing touches the global RNG. A NaN / Inf in ``matrix``
    raises :class:`~ortho_adapters.core.finite.NonFiniteError` naming ``step``, ``statistic`` and ``layer``
    (LAPACK would return arbitrary factors for it).
    """
    if r > min(matrix.shape):
        raise ValueError(f"rank {r} exceeds min{tuple(matrix.shape)} of the matrix")
    check_finite(matrix, step=step, statistic=statistic, layer=layer)
    u, s, vh = torch.linalg.svd(matrix.to(torch.float32), full_matrices=False)
    return u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous()
