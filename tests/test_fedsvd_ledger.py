"""FedSVD clients' node-local privacy ledger: epsilon accumulates across SuperNode restarts and runs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")
pytest.importorskip("opacus")

from test_fedsvd_flower import TINY, _grid, check_privacy_report, replay_epsilon  # noqa: E402

from ortho_adapters.fedsvd.flower.ledger import PrivacyLedger  # noqa: E402
from ortho_adapters.fedsvd.flower.server_app import run_server  # noqa: E402
from ortho_adapters.fedsvd.flower.settings import FedSettings  # noqa: E402
from ortho_adapters.fedsvd.privacy import ClientPrivacy, DPConfig  # noqa: E402

DP = dict(epsilon=3.0, planned_rounds=3)  # each client's noise spends epsilon 3 in 3 rounds of 1 step


def _nodes(state_dir):
    """Fresh SuperNodes (empty Context.state, as after a restart) that keep their ledgers in ``state_dir``."""
    grid = _grid()
    for context in grid.contexts.values():
        context.node_config["state-dir"] = str(state_dir)
    return grid


def test_epsilon_accumulates_across_restarts_and_the_budget_holds(tmp_path):
    settings = FedSettings(**TINY, **DP, experiment_id="exp-1")  # 2 rounds a run, all 3 clients each round
    first = run_server(_nodes(tmp_path), settings)
    check_privacy_report(first, 3.0)
    second = run_server(_nodes(tmp_path), settings)  # restarted nodes, a new run of the same experiment
    for cid, c in second["clients"].items():
        before = first["clients"][cid]
        assert before["rounds_trained"] == [1, 2]
        # this run's rounds: the third round of the experiment fits the budget, the fourth does not
        assert c["rounds_trained"] == [1] and c["rounds_refused"] == [2]
        # the privacy figures cover the whole experiment: 3 steps, replayed independently by Opacus
        assert c["steps"] == 3 == sum(h[2] for h in c["history"])
        assert before["epsilon"] < c["epsilon"] <= 3.0
        assert c["epsilon"] == pytest.approx(replay_epsilon(c), rel=1e-9)
    # without the ledger the restarted nodes would have started at zero and trained both rounds again
    fresh = run_server(_grid(), settings)
    assert all(c["rounds_trained"] == [1, 2] for c in fresh["clients"].values())


def test_experiments_have_separate_ledgers(tmp_path):
    run_server(_nodes(tmp_path), FedSettings(**TINY, **DP, experiment_id="exp-a"))
    other = run_server(_nodes(tmp_path), FedSettings(**TINY, **DP, experiment_id="exp-b"))
    assert all(c["rounds_trained"] == [1, 2] for c in other["clients"].values())
    assert sorted(p.name for p in (tmp_path / "privacy-ledger").iterdir()) == ["exp-a", "exp-b"]


def _privacy() -> ClientPrivacy:
    privacy = ClientPrivacy.create(DPConfig(3.0), num_examples=40, batch_size=4, planned_steps=3)
    privacy.history.append((privacy.noise_multiplier, privacy.sample_rate, 1))
    privacy.rounds.append(1)
    return privacy


def test_ledger_round_trip_is_exact_and_leaves_no_temporary_file(tmp_path):
    ledger = PrivacyLedger(tmp_path, "exp", 2)
    assert ledger.load(DPConfig(3.0)) is None
    privacy = _privacy()
    ledger.save(privacy)
    assert ledger.path == tmp_path / "privacy-ledger" / "exp" / "partition-2.json"
    assert [p.name for p in ledger.path.parent.iterdir()] == ["partition-2.json"]
    loaded = ledger.load(DPConfig(3.0))
    assert loaded.state_dict() == privacy.state_dict()
    assert loaded.epsilon() == privacy.epsilon()


def test_ledger_refuses_bad_keys_corrupt_files_and_other_dp_settings(tmp_path):
    with pytest.raises(ValueError, match="not a valid ledger key"):
        PrivacyLedger(tmp_path, "../escape", 0)
    ledger = PrivacyLedger(tmp_path, "exp", 0)
    ledger.save(_privacy())
    with pytest.raises(ValueError, match="was written with .* this run asks for"):
        ledger.load(DPConfig(6.0))
    ledger.path.write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match="is unreadable"):
        ledger.load(DPConfig(3.0))


def test_a_failed_write_keeps_the_old_ledger(tmp_path, monkeypatch):
    ledger = PrivacyLedger(tmp_path, "exp", 0)
    privacy = _privacy()
    ledger.save(privacy)
    old = ledger.path.read_bytes()
    more = _privacy()
    more.history.append(more.history[0])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ortho_adapters.fedsvd.flower.durable.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        ledger.save(more)
    assert ledger.path.read_bytes() == old
    assert [p.name for p in ledger.path.parent.iterdir()] == ["partition-0.json"]
