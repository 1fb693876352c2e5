"""FedSVD server checkpoints: an interrupted run resumes after its last finished round and ends where an
unbroken run with the same seeds ends (no DP)."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402
from test_fedsvd_flower import TINY, _grid  # noqa: E402

from ortho_adapters.fedsvd.flower.server_app import run_server  # noqa: E402
from ortho_adapters.fedsvd.flower.settings import FedSettings  # noqa: E402

RUN = {**TINY, "rounds": 3}


class Crash(RuntimeError):
    pass


def _crash_after(train_replies: int):
    seen = []

    def tamper(reply):
        if "arrays" in reply.content:  # a training reply (not the partition query)
            seen.append(reply)
            if len(seen) > train_replies:
                raise Crash("the server went down")
        return reply

    return tamper


def test_a_resumed_run_ends_like_an_unbroken_one(tmp_path):
    unbroken = run_server(_grid(), FedSettings(**RUN, checkpoint_dir=str(tmp_path / "unbroken")))
    settings = FedSettings(**RUN, checkpoint_dir=str(tmp_path / "resumed"))
    with pytest.raises(Crash):  # dies while round 2's replies come in: round 1 is checkpointed
        run_server(_grid(tamper=_crash_after(3)), settings)
    assert (tmp_path / "resumed" / "global-round-1.safetensors").exists()
    resumed = run_server(_grid(), settings)
    want = load_file(str(tmp_path / "unbroken" / "global-round-3.safetensors"))
    got = load_file(str(tmp_path / "resumed" / "global-round-3.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].equal(want[key]), key
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in unbroken["rounds"]]
    assert [r["clients_sampled"] for r in resumed["rounds"][1:]] == [
        r["clients_sampled"] for r in unbroken["rounds"][1:]
    ]
    assert resumed["clients"] == unbroken["clients"]
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        "global-round-3.safetensors",
        "progress.json",
    ]


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    run_server(_grid(), FedSettings(**{**RUN, "rounds": 1}, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"another experiment \(settings differ: \['lr'\]\)"):
        run_server(_grid(), FedSettings(**{**RUN, "lr": 0.1}, checkpoint_dir=str(tmp_path)))
