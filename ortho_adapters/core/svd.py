"""fp32 truncated SVD shared by the SVD-based methods: full (LAPACK) or randomized, one matrix or many.

The randomized path is the range finder with subspace iteration of Halko, Martinsson and Tropp, "Finding
structure with randomness" (SIAM Review 2011, Alg. 4.4 + 5.1): with a Gaussian test matrix ``Omega``
(n x q, ``q = r + p``), ``Q = orth((A A^T)^k A Omega)`` (re-orthonormalized after every product), then
the SVD of the small ``Q^T A`` (q x n) gives ``A ~= (Q U) S V^T``, of which the top ``r`` are kept. It
costs ``O(m n q (2k + 2))`` instead of the full SVD's ``O(m n min(m, n))``; its excess error over the
best rank-r approximation shrinks with the spectral gap raised to the power ``2k + 1``
(``scripts/bench_init.py`` measures it on real LoRA-SB update estimates).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Literal, Optional

import torch

from .finite import check_finite

SVDMethod = Literal["auto", "full", "randomized"]
SVD_METHODS: tuple[str, ...] = ("auto", "full", "randomized")

# Randomized SVD settings (Halko et al. recommend p = 5..10 and a few power iterations for spectra that
# decay slowly, as sign matrices' do); chosen with scripts/bench_init.py.
OVERSAMPLE = 10
POWER_ITERATIONS = 4
SEED = 0  # a fixed draw: every process of a distributed run computes the same factors
# "auto" takes the randomized path when the sketch (q = r + OVERSAMPLE columns) is at most this fraction
# of the smaller side; below that the full SVD is as fast and exact.
AUTO_SKETCH_FRACTION = 0.25
# Matrices of one shape are stacked into batches of at most this many bytes (fp32) for batched SVDs.
BATCH_BYTES = 256 * 2**20


def resolve_svd_method(method: str, shape: tuple[int, int], r: int) -> str:
    """``"full"`` or ``"randomized"`` for a matrix of ``shape`` and rank ``r`` (``"auto"``: by size)."""
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "randomized" if r + OVERSAMPLE <= AUTO_SKETCH_FRACTION * min(shape) else "full"


def _orthonormal_columns(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def randomized_svd(
    matrices: torch.Tensor, r: int, oversample: int = OVERSAMPLE, power_iterations: int = POWER_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``r`` ``(U, S, Vh)`` of fp32 ``matrices`` (``(..., m, n)``) by Halko et al.'s Alg. 4.4 + 5.1.

    The test matrix comes from a private generator seeded with :data:`SEED` on the matrices' device: the
    result is reproducible and the global RNG is never touched.
    """
    m, n = matrices.shape[-2:]
    transposed = m < n  # sketch the larger side's range: work on the tall matrix
    a = matrices.mT if transposed else matrices
    q = min(r + oversample, min(m, n))
    generator = torch.Generator(device=a.device).manual_seed(SEED)
    omega = torch.randn(a.shape[-1], q, generator=generator, device=a.device, dtype=a.dtype)
    basis = _orthonormal_columns(a @ omega)
    for _ in range(power_iterations):
        basis = _orthonormal_columns(a @ _orthonormal_columns(a.mT @ basis))
    u_small, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    u = basis @ u_small[..., :r]
    s, vh = s[..., :r], vh[..., :r, :]
    if transposed:
        u, vh = vh.mT, u.mT
    return u.contiguous(), s.contiguous(), vh.contiguous()


def _svd(matrices: torch.Tensor, r: int, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if method == "randomized":
        return randomized_svd(matrices, r)
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return u[..., :r].contiguous(), s[..., :r].contiguous(), vh[..., :r, :].contiguous()


def _check_rank(shape: tuple[int, ...], r: int, layer: Optional[str] = None) -> None:
    if r > min(shape):
        where = f" of layer '{layer}'" if layer else ""
        raise ValueError(f"rank {r} exceeds min{tuple(shape)} of the matrix{where}")


def truncated_svd(
    matrix: torch.Tensor,
    r: int,
    *,
    method: SVDMethod = "full",
    step: str = "truncated_svd",
    statistic: str = "input matrix",
    layer: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``r`` factors ``(U_r, S_r, Vh_r)`` of ``matrix`` in fp32 (the best ones with ``method="full"``,
    Eckart-Young; near-best with ``"randomized"``; ``"auto"`` picks by size, see :func:`resolve_svd_method`).

    The SVD runs on the matrix's own device; nothing touches the global RNG. A NaN / Inf in ``matrix``
    raises :class:`~ortho_adapters.core.finite.NonFiniteError` naming ``step``, ``statistic`` and ``layer``
    (LAPACK would return arbitrary factors for it).
    """
    _check_rank(matrix.shape, r, layer)
    check_finite(matrix, step=step, statistic=statistic, layer=layer)
    return _svd(matrix.to(torch.float32), r, resolve_svd_method(method, tuple(matrix.shape), r))


def truncated_svds(
    matrices: MutableMapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    *,
    method: SVDMethod = "full",
    step: str = "truncated_svd",
    statistic: str = "input matrix",
) -> Iterator[tuple[list[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """:func:`truncated_svd` of many named matrices, batched where shape and rank agree.

    Yields ``(names, (U, S, Vh))`` with the factors stacked along a leading dimension in the order of
    ``names``; each batch holds at most :data:`BATCH_BYTES` of fp32 input. Every matrix is checked for
    rank and NaN / Inf (naming its layer) before any SVD runs. ``matrices`` is consumed: each entry is
    removed once stacked, so no more than one batch is held twice.
    """
    groups: dict[tuple, list[str]] = {}
    for name, matrix in matrices.items():
        _check_rank(matrix.shape, ranks[name], name)
        check_finite(matrix, step=step, statistic=statistic, layer=name)
        key = (tuple(matrix.shape), ranks[name], matrix.device)
        groups.setdefault(key, []).append(name)
    for (shape, r, _), names in groups.items():
        per_batch = max(1, BATCH_BYTES // (4 * shape[0] * shape[1]))
        chosen = resolve_svd_method(method, shape, r)
        for start in range(0, len(names), per_batch):
            batch = names[start : start + per_batch]
            stack = torch.stack([matrices.pop(name).to(torch.float32) for name in batch])
            yield batch, _svd(stack, r, chosen)
            del stack
