"""Seeded random orthonormal factors (FedSVD's and the continual subspace mode's frozen ``A``)."""

from __future__ import annotations

import zlib

import torch


def random_orthonormal_rows(r: int, n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An ``r x n`` matrix with orthonormal rows (Haar-distributed, computed in fp64, returned in ``dtype``).

    QR of an ``n x r`` Gaussian matrix, with the signs of ``R``'s diagonal folded into ``Q`` so that the
    result is unique for a given seed. Needs ``r <= n``.
    """
    if r > n:
        raise ValueError(f"cannot build {r} orthonormal rows of length {n}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    gauss = torch.randn(n, r, generator=g, dtype=torch.float64)
    q, rr = torch.linalg.qr(gauss)
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0
    return (q * signs).t().contiguous().to(dtype)


def layer_seed(seed: int, module_name: str) -> int:
    """A per-layer seed: ``seed`` mixed with a stable hash of the module's name."""
    return (int(seed) * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63)
