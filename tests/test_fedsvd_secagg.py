"""SecAgg+ rounds (``secure_aggregation``): the server learns only the weighted average of the updates.

In-process nodes (``LocalGrid``) run Flower's real ``secaggplus_mod`` and ``SecAggPlusWorkflow``: the key
agreement, secret sharing, masking, quantization and unmasking all happen; only the transport is local.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("opacus")

from test_fedsvd_flower import TINY, _grid, check_privacy_report  # noqa: E402

from ortho_adapters.fedsvd.flower import secagg_server  # noqa: E402
from ortho_adapters.fedsvd.flower.server_app import run_server  # noqa: E402
from ortho_adapters.fedsvd.flower.settings import FedSettings  # noqa: E402

ONE_ROUND = {**TINY, "rounds": 1}


def _products(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer ``B A`` (the update a FedSVD layer applies; its factors are unique only up to rotation), and
    every other tensor as is."""
    out = {}
    for key, value in state.items():
        if "fedsvd_B" in key:
            out[key] = value @ state[key.replace("fedsvd_B.weight", "fedsvd_A")]
        elif "fedsvd_A" not in key:
            out[key] = value
    return out


def _final_state(monkeypatch, settings: FedSettings, grid) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run ``settings`` on ``grid``; return the report and the final global state."""
    finals = []
    original = secagg_server.FedSVDStrategy.finish_round

    def keep(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        finals.append({k: v.clone() for k, v in self.global_state.items()})
        return out

    monkeypatch.setattr(secagg_server.FedSVDStrategy, "finish_round", keep)
    report = run_server(grid, settings)
    return report, finals[-1]


@pytest.mark.parametrize("arm", ["fedsvd", "fedavg_lora"])
def test_secure_round_equals_the_plain_weighted_average(monkeypatch, arm):
    plain_report, plain = _final_state(monkeypatch, FedSettings(**ONE_ROUND, arm=arm), _grid())
    received = []
    original = secagg_server.SecureAggregationStrategy.aggregate_fit

    def spy(self, server_round, results, failures):
        received.append([res for _, res in results])
        return original(self, server_round, results, failures)

    monkeypatch.setattr(secagg_server.SecureAggregationStrategy, "aggregate_fit", spy)
    replies = []

    def keep(reply):
        replies.append(reply)
        return reply

    settings = FedSettings(**ONE_ROUND, arm=arm, secure_aggregation=True)
    secure_report, secure = _final_state(monkeypatch, settings, _grid(tamper=keep))

    # the same clients trained, and the aggregate equals the plain weighted average within 1e-4
    assert secure_report["rounds"][1]["clients_trained"] == plain_report["rounds"][1]["clients_trained"] == 3
    a, b = _products(plain), _products(secure)
    assert sorted(a) == sorted(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-4, worst
    assert secure_report["final_accuracy"] == pytest.approx(plain_report["final_accuracy"], abs=0.05)

    # the strategy got one array list for the round, shared by all clients: the unmasked average
    (results,) = received
    assert len(results) == 3 and len({id(res.parameters) for res in results}) == 1
    # no client reply carried an array: the masked vector travels as bytes inside the SecAgg+ record
    train_replies = [r for r in replies if "secaggplus_configs" in r.content.config_records]
    assert train_replies and all(
        all(len(rec) == 0 for rec in r.content.array_records.values()) for r in train_replies
    )


def test_secure_rounds_with_dp_keep_the_budget_and_refusals_send_zero_weight(monkeypatch):
    # planned for 1 round: every client trains in round 1 and refuses (n_i = 0, zeros) in round 2
    settings = FedSettings(**TINY, epsilon=3.0, planned_rounds=1, secure_aggregation=True)
    report, _ = _final_state(monkeypatch, settings, _grid())
    check_privacy_report(report, 3.0)
    assert [r["clients_trained"] for r in report["rounds"][1:]] == [3, 0]
    assert all(c["rounds_trained"] == [1] and c["rounds_refused"] == [2] for c in report["clients"].values())
    json.dumps(report)


def test_secure_aggregation_needs_three_clients_a_round():
    with pytest.raises(ValueError, match="clients_per_round >= 3"):
        FedSettings(**{**TINY, "clients_per_round": 2}, secure_aggregation=True)
