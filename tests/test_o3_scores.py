"""O3's math against independent references: sklearn's Ledoit-Wolf, numpy loops for the Mahalanobis and
max-cosine scores, the orthogonality penalty and the contrastive entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import get_peft_model
from tiny_models import MODEL_CASES

import ortho_adapters
from ortho_adapters.o3 import orthogonality_penalty
from ortho_adapters.o3.detector import contrastive_entropy
from ortho_adapters.o3.layer import O3Layer
from ortho_adapters.o3.scores import (
    aggregate,
    fit_stats,
    layer_scores,
    ledoit_wolf_covariance,
    mahalanobis,
    max_cosine,
    soft_weight,
)


@pytest.mark.parametrize("n,d", [(12, 30), (50, 8)])
def test_ledoit_wolf_matches_sklearn(n, d):
    sklearn_cov = pytest.importorskip("sklearn.covariance")
    x = np.random.default_rng(0).normal(size=(n, d)) * np.linspace(0.5, 3, d) + 2.0
    ours = ledoit_wolf_covariance(torch.from_numpy(x)).numpy()
    ref = sklearn_cov.LedoitWolf().fit(x).covariance_
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_mahalanobis_and_max_cosine_match_loops():
    rng = np.random.default_rng(1)
    bank, f = rng.normal(size=(15, 6)), rng.normal(size=(4, 6))
    cov = np.cov(bank.T, bias=True) + 0.1 * np.eye(6)
    prec, mean = np.linalg.inv(cov), bank.mean(0)
    ours = mahalanobis(torch.from_numpy(f), torch.from_numpy(mean), torch.from_numpy(prec)).numpy()
    ref = [np.sqrt((v - mean) @ prec @ (v - mean)) for v in f]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    cos = max_cosine(torch.from_numpy(f).float(), torch.from_numpy(bank).float()).numpy()
    ref_cos = [max(v @ b / np.linalg.norm(v) / np.linalg.norm(b) for b in bank) for v in f]
    np.testing.assert_allclose(cos, ref_cos, rtol=1e-5)


def test_fit_stats_scores_and_ramp():
    g = torch.Generator().manual_seed(0)
    fit, held = torch.randn(2, 20, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    stats = fit_stats(fit, held, full_z=1.0, zero_z=3.0)
    # per-layer scores against a direct evaluation with sklearn's covariance
    sklearn_cov = pytest.importorskip("sklearn.covariance")
    raw = layer_scores(stats, held).numpy()
    for layer in range(2):
        cov = sklearn_cov.LedoitWolf().fit(fit[layer].double().numpy()).covariance_
        diff = held[layer].double().numpy() - fit[layer].double().numpy().mean(0)
        dist = np.sqrt(np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(raw[layer, 0], -dist, rtol=1e-5)
    # standardized on the held-out set: the aggregated held-out scores have mean 0
    s = aggregate(stats, held)
    assert abs(float(s.mean())) < 1e-5
    mu, sd = s.mean(), s.std(unbiased=False)
    torch.testing.assert_close(stats.ramp, torch.stack([mu - 3 * sd, mu - sd]))
    w = soft_weight(stats, torch.tensor([mu - 5 * sd, mu - 2 * sd, mu, mu + 9]))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="held-out"):
        fit_stats(fit, held[:, :0], 1.0, 3.0)


def test_contrastive_entropy_matches_loop():
    g = torch.Generator().manual_seed(2)
    f, r = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    total = 0.0
    for layer in range(3):
        for i in range(5):
            fi = f[layer, i] / f[layer, i].norm()
            logits = torch.stack([fi @ (r[layer, j] / r[layer, j].norm()) / 0.1 for j in range(5)])
            p = torch.softmax(logits.double(), 0)
            total += float(-(p * p.log()).sum()) / 5
    assert float(contrastive_entropy(f, r, 0.1)) == pytest.approx(total, rel=1e-5)


def test_orthogonality_penalty_matches_numpy_loop():
    case = MODEL_CASES["llama"]
    model = get_peft_model(
        case.model(), ortho_adapters.O3Config(r=4, target_modules=list(case.targets), gate=False)
    )
    base = model.base_model
    assert float(orthogonality_penalty(model).detach()) == 0.0  # first request: nothing to be orthogonal to
    base.start_request("one")  # the first request owns the initial LoRA: nothing frozen
    assert all(m.request_stacks("default")[0] is None for m in model.modules() if isinstance(m, O3Layer))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    base.start_request("two")  # freezes "one"
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    base.start_request("three")  # freezes "two": two frozen A per layer
    assert model.peft_config["default"].requests == ["one", "two", "three"]
    layers = [m for m in model.modules() if isinstance(m, O3Layer)]
    ref = []
    for layer in layers:
        frozen = layer.o3_frozen_A["default"].numpy()
        a_t = layer.o3_lora["default"].lora_A.weight.detach().numpy()
        assert frozen.shape[0] == 2
        ref.append(sum(np.linalg.norm(frozen[i] @ a_t.T, "fro") ** 2 for i in range(frozen.shape[0])))
    penalty = orthogonality_penalty(model)
    assert float(penalty) == pytest.approx(float(np.mean(ref)), rel=1e-5)
    penalty.backward()
    assert all(m.o3_lora["default"].lora_A.weight.grad is not None for m in layers)
