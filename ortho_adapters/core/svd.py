"""fp32 truncated SVD helpers shared by the SVD-based methods."""

from __future__ import annotations

import torch


def truncated_svd(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors ``(U_r, S_r, Vh_r)`` of ``matrix`` (Eckart-Young), computed in fp32.

    The SVD runs on the matrix's own device; nothing touches the global RNG.
    """
    if r > min(matrix.shape):
        raise ValueError(f"rank {r} exceeds min{tuple(matrix.shape)} of the matrix")
    u, s, vh = torch.linalg.svd(matrix.to(torch.float32), full_matrices=False)
    return u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous()
