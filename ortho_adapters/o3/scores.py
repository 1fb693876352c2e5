"""The OOD detector's per-layer scores and their calibration into a soft gate weight (arXiv 2407.10223).

For request ``t`` and detector layer ``l`` with fit features ``F_l`` (N x d):

* global score: Mahalanobis distance ``sqrt((f - mu_l)^T S_l^{-1} (f - mu_l))`` with ``S_l`` the Ledoit-Wolf
  shrinkage covariance of ``F_l`` (the official plain covariance is singular when N < d);
* local score: ``max_j cos(f, F_l[j])``.

Aggregation (deviation from the official one-class SVM, documented): each of the ``2L`` in-distribution scores
(``-distance`` and ``cosine``) is standardized with its mean / sd on the request's held-out 20%, and averaged:
``s(x)``. Calibration: with ``mu, sd`` the mean / sd of ``s`` on the held-out set,
``w(x) = clip((s(x) - lo) / (hi - lo), 0, 1)``, ``hi = mu - full_z * sd``, ``lo = mu - zero_z * sd``.
``(mu, sd)`` are kept (``center``), so :func:`ramp` can move the ramp later without refitting anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.finite import check_finite


def ledoit_wolf_covariance(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of the rows of ``x`` (N x d), in float64 (Ledoit & Wolf, 2004).

    ``S = (1 - a) C + a mu I`` with ``C`` the (1/N) empirical covariance, ``mu = tr(C)/d`` and the shrinkage
    ``a = min(beta, delta) / delta``, ``delta = ||C - mu I||_F^2 / d``,
    ``beta = (sum_k ||x_k x_k^T - C||_F^2) / (N^2 d)`` over centred rows ``x_k``.
    """
    x = x.to(torch.float64)
    n, d = x.shape
    xc = x - x.mean(0, keepdim=True)
    cov = xc.t() @ xc / n
    mu = torch.trace(cov) / d
    delta = ((cov - mu * torch.eye(d, dtype=x.dtype, device=x.device)) ** 2).sum() / d
    # sum_k ||x_k x_k^T||_F^2 = sum_k ||x_k||^4; sum_k <x_k x_k^T, C> = N ||C||_F^2
    beta = ((xc**2).sum(1) ** 2).sum() / n - (cov**2).sum()
    beta = beta / (n * d)
    shrinkage = torch.tensor(0.0, dtype=x.dtype) if delta == 0 else torch.clamp(beta, max=delta) / delta
    return (1 - shrinkage) * cov + shrinkage * mu * torch.eye(d, dtype=x.dtype, device=x.device)


def mahalanobis(f: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances of the rows of ``f`` (B x d) to ``mean`` under ``precision`` (d x d)."""
    diff = f.to(precision.dtype) - mean.to(precision.dtype)
    return torch.einsum("bi,ij,bj->b", diff, precision, diff).clamp(min=0).sqrt()


def max_cosine(f: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``max_j cos(f_b, bank_j)`` for each row of ``f`` (B x d) against ``bank`` (N x d)."""
    fn = torch.nn.functional.normalize(f.float(), dim=-1)
    bn = torch.nn.functional.normalize(bank.float(), dim=-1)
    return (fn @ bn.t()).max(dim=-1).values


@dataclass
class RequestStats:
    """Everything the gate keeps for one request (all tensors; saved with the adapter)."""

    mean: torch.Tensor  # (L, d) fit-feature means
    precision: torch.Tensor  # (L, d, d) inverse Ledoit-Wolf covariances (float64)
    bank: torch.Tensor  # (L, N, d) fit features for the local score
    score_mu: torch.Tensor  # (L, 2) held-out mean of (-distance, cosine)
    score_sd: torch.Tensor  # (L, 2) held-out sd of (-distance, cosine)
    center: torch.Tensor  # (2,) mean and sd of the aggregated score s on the held-out set
    ramp: torch.Tensor  # (2,) lo, hi of the calibration ramp

    FIELDS = ("mean", "precision", "bank", "score_mu", "score_sd", "center", "ramp")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().contiguous() for name in self.FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RequestStats:
        missing = [name for name in cls.FIELDS if name not in tensors]
        if missing:
            raise ValueError(f"O3 gate statistics are missing {missing}")
        return cls(**{name: tensors[name] for name in cls.FIELDS})


def layer_scores(stats: RequestStats, feats: torch.Tensor) -> torch.Tensor:
    """Raw in-distribution scores ``(L, 2, B)``: ``-Mahalanobis`` and ``max cosine`` per detector layer."""
    out = []
    for layer in range(feats.shape[0]):
        dist = mahalanobis(feats[layer], stats.mean[layer], stats.precision[layer]).float()
        cos = max_cosine(feats[layer], stats.bank[layer])
        out.append(torch.stack([-dist, cos]))
    return torch.stack(out)


def aggregate(stats: RequestStats, feats: torch.Tensor) -> torch.Tensor:
    """Aggregated score ``s(x)`` (B,): mean of the standardized layer scores (higher: more in-dist.)."""
    raw = layer_scores(stats, feats)
    z = (raw - stats.score_mu.unsqueeze(-1)) / stats.score_sd.unsqueeze(-1)
    return z.mean(dim=(0, 1))


def soft_weight(stats: RequestStats, score: torch.Tensor) -> torch.Tensor:
    """``w = clip((s - lo) / (hi - lo), 0, 1)``: exactly 0 below ``lo``, exactly 1 above ``hi``."""
    lo, hi = stats.ramp[0], stats.ramp[1]
    return ((score - lo) / (hi - lo)).clamp(0.0, 1.0)


def check_ramp(full_z: float, zero_z: float) -> None:
    """Raise unless ``0 <= full_z < zero_z``."""
    if not 0 <= full_z < zero_z:
        raise ValueError(f"the gate ramp needs 0 <= full_z < zero_z, got {full_z}, {zero_z}")


def ramp(center: torch.Tensor, full_z: float, zero_z: float) -> torch.Tensor:
    """``(lo, hi) = (mu - zero_z * sd, mu - full_z * sd)`` from ``center = (mu, sd)``."""
    check_ramp(full_z, zero_z)
    mu, sd = center[0], center[1]
    return torch.stack([mu - zero_z * sd, mu - full_z * sd]).float()


def fit_stats(
    fit: torch.Tensor, held_out: torch.Tensor, full_z: float, zero_z: float, step: str = "fit_stats"
) -> RequestStats:
    """Fit the per-layer statistics on ``fit`` (L x N x d) and calibrate on ``held_out`` (L x M x d).

    Raises:
        NonFiniteError: a NaN / Inf in the features of a detector layer, or in a statistic fitted from them
            (precision, calibration); the message names ``step`` and the detector layer.
    """
    if fit.shape[1] < 2 or held_out.shape[1] < 1:
        raise ValueError(
            f"the O3 gate needs >= 2 fit and >= 1 held-out samples, got {fit.shape[1]}, {held_out.shape[1]}"
        )
    for features, which in ((fit, "fit"), (held_out, "held-out")):
        for layer in range(features.shape[0]):
            check_finite(
                features[layer],
                step=step,
                statistic=f"detector features (mean-pooled hidden states) of the {which} texts",
                layer=f"detector layer {layer}",
            )
    fit = fit.float()
    means, precisions = [], []
    for layer in range(fit.shape[0]):
        means.append(fit[layer].mean(0))
        precisions.append(torch.linalg.inv(ledoit_wolf_covariance(fit[layer])))
        check_finite(
            precisions[-1],
            step=step,
            statistic="precision (inverse Ledoit-Wolf covariance)",
            layer=f"detector layer {layer}",
        )
    stats = RequestStats(
        mean=torch.stack(means),
        precision=torch.stack(precisions),
        bank=fit.clone(),
        score_mu=torch.zeros(fit.shape[0], 2),
        score_sd=torch.ones(fit.shape[0], 2),
        center=torch.tensor([0.0, 1.0]),
        ramp=torch.tensor([0.0, 1.0]),
    )
    raw = layer_scores(stats, held_out.float())
    stats.score_mu = raw.mean(-1)
    # one held-out sample has no spread: fall back to 1 (no scaling); never divide by ~0
    sd = raw.std(-1, unbiased=False) if raw.shape[-1] > 1 else torch.ones_like(stats.score_mu)
    stats.score_sd = sd.clamp(min=1e-6)
    s = aggregate(stats, held_out.float())
    mu, spread = s.mean(), (s.std(unbiased=False) if s.numel() > 1 else torch.tensor(1.0))
    stats.center = torch.stack([mu, spread.clamp(min=1e-6)]).float()
    stats.ramp = ramp(stats.center, full_z, zero_z)
    for name in ("score_mu", "score_sd", "center", "ramp"):
        check_finite(getattr(stats, name), step=step, statistic=f"gate calibration statistic {name}")
    return stats
