"""FedSVD as a secured Flower deployment on 127.0.0.1: TLS, SuperNode authentication, SecAgg+, restarts.

Real processes (:class:`~ortho_adapters.fedsvd.flower.local_deployment.LocalDeployment`): one SuperLink with a
certificate from our own CA and ``--enable-supernode-auth``, three SuperNodes with registered P-384 keys,
``flwr run``. Slow (2-4 min a test): every ClientApp message runs in a fresh ``flwr-clientapp`` process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("opacus")

from safetensors.torch import load_file  # noqa: E402
from test_fedsvd_flower import TINY, _grid, replay_epsilon  # noqa: E402
from test_fedsvd_secagg import _products  # noqa: E402

from ortho_adapters.fedsvd.flower.local_deployment import LocalDeployment  # noqa: E402
from ortho_adapters.fedsvd.flower.server_app import run_server  # noqa: E402
from ortho_adapters.fedsvd.flower.settings import FedSettings  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "fedsvd_app"
# the fast tests' tiny experiment (3 clients, all in every round), with time for SuperNodes to connect
SMALL = {**{k: v for k, v in TINY.items() if k not in ("rounds", "progress")}, "node_wait_s": 180.0}


def _final_state(checkpoint_dir: Path, server_round: int) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dir / f"global-round-{server_round}.safetensors"))


def _in_process_state(tmp_path: Path, **settings) -> dict[str, torch.Tensor]:
    """The same experiment run in this process (plain aggregation, fresh nodes): its final global state."""
    ckpt = tmp_path / "reference-ckpt"
    grid = _grid()
    for context in grid.contexts.values():
        context.node_config["state-dir"] = str(tmp_path / "reference-state")
    run_server(grid, FedSettings(**SMALL, **settings, checkpoint_dir=str(ckpt), progress=False))
    return _final_state(ckpt, settings["rounds"])


@pytest.mark.slow
def test_tls_and_node_auth_refuse_strangers_and_secagg_equals_the_plain_average(tmp_path):
    with LocalDeployment(tmp_path / "deployment", num_nodes=3) as dep:
        # a node whose key was never registered, and a node without a key: both exit non-zero
        stranger, _ = dep.node_key(99)
        unregistered = dep.start_node(0, private_key=stranger)
        assert not dep.wait_active(unregistered), "a node with an unregistered key was let in"
        keyless = dep.start_node(1, keyless=True)
        assert not dep.wait_active(keyless), "a node without a key was let in"
        assert unregistered.wait(30) != 0 and keyless.wait(30) != 0
        refusals = [p.log_path.read_text() for p in (unregistered, keyless)]
        dep.close_nodes()

        dep.start_nodes()
        assert len(set(dep.node_ids.values())) == 3
        for proc in dep.nodes.values():
            assert dep.wait_active(proc)
        ckpt = tmp_path / "ckpt"
        report = dep.run(
            APP,
            {**SMALL, "rounds": 1, "secure_aggregation": True, "checkpoint_dir": str(ckpt),
             "report": str(tmp_path / "report.json")},
        )  # fmt: skip
    assert "2004" in refusals[0] and "2001" in refusals[1]  # Flower's codes: unknown key, no key
    assert report["rounds"][1]["clients_trained"] == 3
    secure = _products(_final_state(ckpt, 1))
    plain = _products(_in_process_state(tmp_path, rounds=1))
    worst = max(float((secure[k] - plain[k]).abs().max()) for k in plain)
    assert worst <= 1e-4, worst


@pytest.mark.slow
def test_a_killed_and_restarted_supernode_keeps_its_epsilon_and_the_experiment_resumes(tmp_path):
    dp = dict(epsilon=3.0, planned_rounds=2, experiment_id="restart-test")
    ckpt = tmp_path / "ckpt"
    with LocalDeployment(tmp_path / "deployment", num_nodes=3) as dep:
        dep.start_nodes()
        config = {**SMALL, **dp, "checkpoint_dir": str(ckpt), "report": str(tmp_path / "first.json")}
        first = dep.run(APP, {**config, "rounds": 1})
        after_first = _final_state(ckpt, 1)
        node_id = dep.node_ids[0]
        assert dep.stop_node(0, kill=True) != 0  # a crash: SIGKILL, no clean shutdown
        dep.restart_node(0)  # the same key, so the same node id; its in-memory Context.state is gone
        assert dep.node_ids[0] == node_id
        second = dep.run(APP, {**config, "rounds": 2, "report": str(tmp_path / "second.json")})
    # the second run resumed after round 1 (server checkpoint) and trained round 2
    assert [r["round"] for r in second["rounds"]] == [0, 1, 2] and second["rounds"][2]["clients_trained"] == 3
    for cid, client in second["clients"].items():
        before = first["clients"][cid]
        # the restarted node's ledger carried round 1 over: 2 steps, replayed independently by Opacus
        assert client["rounds_trained"] == [1, 2] and client["steps"] == 2
        assert sum(h[2] for h in client["history"]) == 2
        assert before["epsilon"] < client["epsilon"] <= 3.0
        assert client["epsilon"] == pytest.approx(replay_epsilon(client), rel=1e-9)
    # and the broken-up experiment ends where an unbroken one (same seeds, in this process) ends
    unbroken = _in_process_state(tmp_path, rounds=2, **dp)
    resumed = _final_state(ckpt, 2)
    assert sorted(resumed) == sorted(unbroken)
    # equal up to float rounding (other processes, other thread counts; measured 6e-7 at most), far below
    # what round 2 changed, so a lost or repeated round cannot hide under the tolerance
    step = max(float((resumed[k] - after_first[k]).abs().max()) for k in resumed if "fedsvd_B" in k)
    assert step > 1e-3, step
    for key in unbroken:
        torch.testing.assert_close(resumed[key], unbroken[key], rtol=1e-5, atol=2e-6, msg=key)
