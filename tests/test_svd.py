"""core/svd.py: the randomized truncated SVD against LAPACK's full SVD, and the batched form."""

from __future__ import annotations

import pytest
import torch

from ortho_adapters.core.finite import NonFiniteError
from ortho_adapters.core.svd import randomized_svd, resolve_svd_method, truncated_svd, truncated_svds


def _sign_matrix(m: int, n: int, tokens: int = 256, seed: int = 0) -> torch.Tensor:
    """``-sign(Y^T X)`` with decaying token scales: the shape of a LoRA-SB update estimate."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, tokens).sqrt()
    y = torch.randn(tokens, m, generator=g) * scales[:, None]
    return -torch.sign(y.t() @ torch.randn(tokens, n, generator=g))


def _gapped(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    """Rank-r signal (singular values 10..1) plus 1e-3 noise: a clear gap after the r-th value."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    return (u * torch.linspace(10, 1, r)) @ v.t() + 1e-3 * torch.randn(m, n, generator=g)


def _rank_r(matrix: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (128, 128)])
@pytest.mark.parametrize("r", [4, 16])
def test_randomized_residual_is_within_one_percent_of_the_best(shape, r):
    matrix = _sign_matrix(*shape)
    u, s, vh = randomized_svd(matrix, r)
    assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
    torch.testing.assert_close(u.t() @ u, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.t(), torch.eye(r), atol=1e-5, rtol=0)
    best = (matrix.double() - _rank_r(matrix, r)).norm()
    assert (matrix.double() - ((u * s) @ vh).double()).norm() <= 1.01 * best


def test_randomized_equals_the_exact_truncation_when_the_spectrum_has_a_gap():
    matrix = _gapped(200, 120, 8)
    u, s, vh = randomized_svd(matrix, 8)
    exact = _rank_r(matrix, 8)
    assert ((u * s) @ vh).double().sub(exact).norm() <= 1e-5 * exact.norm()
    torch.testing.assert_close(s, torch.linalg.svdvals(matrix)[:8], atol=1e-4, rtol=0)


def test_randomized_is_reproducible_and_leaves_the_global_rng_alone():
    matrix = _sign_matrix(64, 80)
    state = torch.get_rng_state()
    first = randomized_svd(matrix, 4)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    second = randomized_svd(matrix, 4)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_auto_takes_the_randomized_path_only_for_a_small_sketch():
    assert resolve_svd_method("auto", (576, 1536), 16) == "randomized"
    assert resolve_svd_method("auto", (64, 64), 16) == "full"
    assert resolve_svd_method("full", (4096, 4096), 8) == "full"
    with pytest.raises(ValueError, match="svd method must be one of"):
        resolve_svd_method("lowrank", (8, 8), 2)


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_batched_svds_equal_one_at_a_time(method, monkeypatch):
    import ortho_adapters.core.svd as svd

    monkeypatch.setattr(svd, "BATCH_BYTES", 2 * 4 * 48 * 40)  # two matrices of 48 x 40 per batch
    shapes = {"a": (48, 40), "b": (40, 48), "c": (48, 40), "d": (48, 40), "e": (48, 40)}
    matrices = {name: _sign_matrix(*shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    ranks = {name: 3 if name == "e" else 4 for name in shapes}
    copies = {name: m.clone() for name, m in matrices.items()}
    seen = []
    for names, (us, ss, vhs) in truncated_svds(matrices, ranks, method=method):
        assert len(names) <= 2
        for name, u, s, vh in zip(names, us, ss, vhs):
            want = truncated_svd(copies[name], ranks[name], method=method)
            torch.testing.assert_close(((u * s) @ vh), (want[0] * want[1]) @ want[2], atol=1e-5, rtol=0)
            seen.append(name)
    assert sorted(seen) == sorted(shapes) and not matrices  # each matrix consumed once


def test_batched_svds_check_every_matrix_before_any_svd():
    good, bad = _sign_matrix(20, 30), _sign_matrix(20, 30)
    bad[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="layer 'model.bad'"):
        next(truncated_svds({"model.good": good, "model.bad": bad}, {"model.good": 2, "model.bad": 2}))
    with pytest.raises(ValueError, match="rank 40 exceeds .* of layer 'model.small'"):
        next(truncated_svds({"model.small": good}, {"model.small": 40}))
