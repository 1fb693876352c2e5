"""FedSVD clients' DP-SGD (Opacus): exact per-sample gradients of B, one accountant for the whole run."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils.data import TensorDataset

import ortho_adapters

opacus = pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant  # noqa: E402

from ortho_adapters.fedsvd.privacy import ClientPrivacy, DPConfig, calibrate_noise  # noqa: E402
from ortho_adapters.fedsvd.training import local_train  # noqa: E402


class SeqClassifier(nn.Module):
    """Token features -> 2 adapted linear layers -> mean over tokens -> head (tokens per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))).mean(1))


def _model(**kw):
    torch.manual_seed(0)
    config = ortho_adapters.FedSVDConfig(r=4, target_modules=["lin0", "lin1"], init_weights=False, **kw)
    return get_peft_model(SeqClassifier(), config)


def _data(n: int = 40, tokens: int = 5, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tokens, 10, generator=g)
    return TensorDataset(x, (x[:, :, 0].mean(1) > 0).long())


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_gradients_of_b_are_exact(mode):
    from opacus import GradSampleModule

    model = _model()
    x, y = _data(6).tensors
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(params) == [
        "base_model.model.lin0.fedsvd_B.default.weight",
        "base_model.model.lin1.fedsvd_B.default.weight",
    ]
    samples = {n: p.grad_sample.detach().clone() for n, p in params.items()}
    gsm._close()  # remove the hooks before the reference per-sample passes
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"),
            list(params.values()),
        )
        for name, g in zip(params, grads):
            torch.testing.assert_close(samples[name][i], g, rtol=1e-5, atol=1e-6, msg=name)


def test_noise_is_calibrated_to_the_planned_steps():
    config = DPConfig(target_epsilon=3.0)
    sigma = calibrate_noise(config, sample_rate=0.25, planned_steps=20)
    acc = RDPAccountant()
    acc.history = [(sigma, 0.25, 20)]
    eps = acc.get_epsilon(delta=1e-5)
    assert 2.9 <= eps <= 3.0


def _replay(report: dict) -> float:
    """An independent accountant fed step by step with the reported schedule."""
    acc = RDPAccountant()
    for sigma, q, steps in report["history"]:
        for _ in range(int(steps)):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=report["delta"])


def test_run_long_accountant_stops_a_client_at_the_target_and_matches_a_replay():
    """A client planned for 2 rounds of 3 steps but sampled in 4 rounds: it trains twice, then refuses."""
    data = _data(40)
    model = _model()
    config = DPConfig(target_epsilon=2.0, max_grad_norm=1.0)
    state = ClientPrivacy.create(config, len(data), batch_size=8, planned_steps=6).state_dict()
    epsilons = []
    for server_round in range(1, 5):
        privacy = ClientPrivacy.from_state(json.loads(json.dumps(state)))  # the state crosses rounds as JSON
        if privacy.can_train(3):
            before = model.base_model.model.lin0.fedsvd_B["default"].weight.detach().clone()
            local_train(model, data, 3, 8, 0.1, _loss, seed=server_round, privacy=privacy)
            assert not torch.equal(before, model.base_model.model.lin0.fedsvd_B["default"].weight)
            privacy.rounds.append(server_round)
        else:
            privacy.skipped.append(server_round)
        epsilons.append(privacy.epsilon())
        state = privacy.state_dict()
    report = ClientPrivacy.from_state(state).report()
    assert report["rounds_trained"] == [1, 2] and report["rounds_refused"] == [3, 4]
    assert report["steps"] == 6 and report["sample_rate"] == pytest.approx(1 / 5)
    assert epsilons[0] < epsilons[1] == epsilons[2] == epsilons[3]  # accumulated, never reset per round
    assert report["epsilon"] <= config.target_epsilon
    assert report["epsilon"] > 0.95 * config.target_epsilon  # the plan spends (almost) all of it
    assert report["epsilon"] == pytest.approx(_replay(report), rel=1e-9, abs=1e-9)
    # a per-round accountant (the official code's bug) would report only one round's epsilon
    assert _replay({"history": [report["history"][0][:2] + [3]], "delta": 1e-5}) < report["epsilon"]


def test_clipping_bounds_every_per_sample_contribution():
    """With zero noise and one huge-gradient sample, the update equals lr * mean of clipped gradients."""
    data = _data(8)
    model = _model()
    privacy = ClientPrivacy(
        DPConfig(target_epsilon=1e9, max_grad_norm=1e-3), sample_rate=1.0, noise_multiplier=0.0
    )
    b = model.base_model.model.lin0.fedsvd_B["default"].weight
    before = b.detach().clone()
    local_train(model, data, 1, 8, 1.0, _loss, seed=0, privacy=privacy)
    # every per-sample gradient is clipped to 1e-3 (flat over all parameters): the step is at most lr * C
    assert (b.detach() - before).norm() <= 1e-3 + 1e-9


def test_dp_config_rejects_bad_values():
    with pytest.raises(ValueError, match="target_epsilon"):
        DPConfig(target_epsilon=0)
    with pytest.raises(ValueError, match="target_delta"):
        DPConfig(target_epsilon=1, target_delta=1.5)
    with pytest.raises(ValueError, match="accountant"):
        DPConfig(target_epsilon=1, accountant="gdp2")
