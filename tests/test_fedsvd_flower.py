"""FedSVD's Flower apps: the ServerApp logic with in-process clients (fast) and a Ray simulation (slow)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant  # noqa: E402

from ortho_adapters.fedsvd.flower.client_app import app as client_app  # noqa: E402
from ortho_adapters.fedsvd.flower.server_app import run_server  # noqa: E402
from ortho_adapters.fedsvd.flower.settings import FedSettings  # noqa: E402

TINY = dict(
    num_clients=3,
    clients_per_round=3,
    rounds=2,
    local_steps=1,
    batch_size=4,
    max_length=16,
    n_train=120,
    n_eval=40,
    r=4,
    targets="query,value",
    progress=False,
)


def _grid(num_nodes: int = 3, tamper=None):
    from local_grid import LocalGrid

    return LocalGrid(client_app, num_nodes, tamper)


def replay_epsilon(client: dict) -> float:
    acc = RDPAccountant()
    for sigma, q, steps in client["history"]:
        for _ in range(int(steps)):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=client["delta"])


def check_privacy_report(report: dict, target: float) -> None:
    """Every client: epsilon <= target, equal to an independent replay of its reported schedule."""
    assert report["clients"]
    for cid, c in report["clients"].items():
        assert c["epsilon"] <= target, cid
        assert c["epsilon"] == pytest.approx(replay_epsilon(c), rel=1e-9), cid
        assert (
            c["steps"]
            == sum(h[2] for h in c["history"])
            == len(c["rounds_trained"]) * report["settings"]["local_steps"]
        )
        assert {"sample_rate", "noise_multiplier", "delta", "rounds_trained"} <= set(c)


def test_server_and_clients_in_process_with_dp(tmp_path):
    settings = FedSettings(**TINY, epsilon=6.0, report=str(tmp_path / "r.json"))
    grid = _grid()
    report = run_server(grid, settings)
    assert (tmp_path / "r.json").exists()
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["rounds"])
    assert all(r["clients_trained"] == 3 for r in report["rounds"][1:])
    check_privacy_report(report, 6.0)
    # the server sends A and B; clients send only B (and the trained head)
    train_msg = next(m for m in grid.sent if "arrays" in m.content)  # after the partition queries
    sent = train_msg.content["arrays"].to_torch_state_dict()
    assert any(k.endswith("fedsvd_A") for k in sent) and any(k.endswith("fedsvd_B.weight") for k in sent)


def test_client_sends_only_b(tmp_path):
    replies = []

    def keep(reply):
        if "arrays" in reply.content:  # not a partition-query answer
            replies.append(reply)
        return reply

    run_server(_grid(tamper=keep), FedSettings(**{**TINY, "rounds": 1}))
    keys = set(replies[0].content["arrays"].to_torch_state_dict())
    assert keys and all("fedsvd_B" in k or "classifier" in k for k in keys)
    assert not any("fedsvd_A" in k for k in keys)


def test_a_client_over_budget_refuses_to_train():
    # planned for 1 round of 1 step, sampled in 3 rounds: trains in round 1 only
    report = run_server(_grid(), FedSettings(**{**TINY, "rounds": 3}, epsilon=3.0, planned_rounds=1))
    for c in report["clients"].values():
        assert c["rounds_trained"] == [1] and c["rounds_refused"] == [2, 3]
    assert [r["clients_trained"] for r in report["rounds"][1:]] == [3, 0, 0]
    assert report["rounds"][2]["accuracy"] == report["rounds"][1]["accuracy"]  # nothing aggregated
    check_privacy_report(report, 3.0)


def test_a_nan_update_is_rejected_naming_client_and_tensor():
    def poison(reply):
        if "arrays" not in reply.content:  # a partition-query answer
            return reply
        arrays = reply.content["arrays"]
        key = next(k for k in arrays if "fedsvd_B" in k)
        state = arrays.to_torch_state_dict()
        state[key][0, 0] = float("nan")
        from flwr.app import ArrayRecord

        reply.content["arrays"] = ArrayRecord.from_torch_state_dict(state)
        return reply

    with pytest.raises(ValueError, match=r"client \d \(node \d+\): tensor '.*fedsvd_B.weight' has NaN"):
        run_server(_grid(tamper=poison), FedSettings(**{**TINY, "rounds": 1}))


def test_fedsvd_equals_ffa_lora_with_orthonormal_a0_under_plain_sgd():
    """The SVD step only rotates A inside its row space: with plain SGD both arms compute one model."""
    from ortho_adapters.fedsvd.flower.state import cached_model

    deltas = {}
    for arm in ("fedsvd", "ffa_orthonormal"):
        settings = FedSettings(**{**TINY, "local_steps": 2}, arm=arm, lr=0.05)  # a stable step: no chaos
        report = run_server(_grid(), settings)
        model = cached_model(settings.spec)
        layer = model.base_model.model.encoder.encoder.layer[0].attention.self.query
        if arm == "fedsvd":
            deltas[arm] = layer.delta_weight("default")
        else:
            deltas[arm] = layer.get_delta_weight("default").detach()
        deltas[arm + "_acc"] = [r["accuracy"] for r in report["rounds"]]
    assert deltas["fedsvd"].abs().max() > 1e-4  # it trained
    torch.testing.assert_close(deltas["fedsvd"], deltas["ffa_orthonormal"], rtol=0, atol=1e-7)
    assert deltas["fedsvd_acc"] == deltas["ffa_orthonormal_acc"]


def test_cli_parses_federated_flags():
    from ortho_adapters.cli import build_parser

    args = build_parser().parse_args(
        ["federated", "--arm", "ffa_kaiming", "--epsilon", "3", "--no-train-head"]
    )
    assert args.arm == "ffa_kaiming" and args.epsilon == 3.0 and args.train_head is False


@pytest.mark.slow
def test_ray_simulation_two_rounds_three_clients(tmp_path):
    from ortho_adapters.fedsvd.flower.simulation import run_federated

    settings = FedSettings(**{**TINY, "progress": True}, epsilon=6.0, report=str(tmp_path / "sim.json"))
    report = run_federated(settings)
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert sorted(report["clients"]) == ["0", "1", "2"]
    check_privacy_report(report, 6.0)
