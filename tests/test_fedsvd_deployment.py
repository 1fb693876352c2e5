"""``ortho-adapters federated --deployment DIR --insecure``: the FedSVD apps as a plain Flower deployment on
127.0.0.1 (the explicit opt-out from TLS and node auth): one SuperLink, two SuperNodes, ``flwr run``. The
secured deployment (TLS, node auth, SecAgg+, restarts) is ``tests/test_fedsvd_secure_deployment.py``.

Slow (~1-3 min): every ClientApp message runs in a fresh ``flwr-clientapp`` process. Everything started here
is stopped on exit; every wait is bounded.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")
pytest.importorskip("opacus")

from ortho_adapters.cli import main  # noqa: E402


@pytest.mark.slow
def test_insecure_deployment_from_the_cli(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    flags = "--rounds 1 --num-clients 2 --clients-per-round 2 --local-steps 1 --batch-size 4 --max-length 16 "
    flags += "--n-train 80 --n-eval 40 --r 4 --epsilon 6"
    argv = ["federated", "--deployment", str(tmp_path / "deployment"), "--insecure", *flags.split()]
    assert main([*argv, "--report", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "insecure" in out and "client 1: trained rounds [1]" in out
    report = json.loads(report_path.read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert sorted(report["clients"]) == ["0", "1"]
    assert all(c["epsilon"] <= 6.0 and c["rounds_trained"] == [1] for c in report["clients"].values())
    # the opt-out really was plain: no certificates were made and the CLI was told `insecure`
    assert not (tmp_path / "deployment" / "certs").exists()
    assert "insecure = true" in (tmp_path / "deployment" / "flwr_home" / "config.toml").read_text()
