"""The FedSVD apps as a real Flower deployment on 127.0.0.1: one SuperLink, two SuperNodes, ``flwr run``.

Slow (~1.5-3 min): every ClientApp message runs in a fresh ``flwr-clientapp`` process. Everything started here
is stopped in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("opacus")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the process and the children it started
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
def test_deployment_one_round_two_supernodes(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr_home"),
        "OMP_NUM_THREADS": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    home = Path(env["FLWR_HOME"])
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    app = tmp_path / "app"
    shutil.copytree(ROOT / "examples" / "fedsvd_app", app)
    report = tmp_path / "report.json"
    procs = []
    try:
        procs.append(
            _start(
                [
                    str(BIN / "flower-superlink"),
                    "--insecure",
                    "--disable-runtime-dependency-installation",
                    "--port",
                    str(port),
                ],
                env,
                tmp_path / "superlink.log",
            )
        )
        for i in range(2):
            procs.append(
                _start(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions=2",
                    ],
                    env,
                    tmp_path / f"supernode{i}.log",
                )
            )
        run_config = (
            f"rounds=1 num_clients=2 clients_per_round=2 local_steps=1 batch_size=4 max_length=16 "
            f"n_train=80 n_eval=40 r=4 epsilon=6.0 node_wait_s=120.0 report='{report}'"
        )
        deadline = time.monotonic() + 60
        while True:  # the SuperLink needs a moment before it accepts runs
            run = subprocess.run(
                [
                    str(BIN / "flwr"),
                    "run",
                    str(app),
                    "local-deployment",
                    "--stream",
                    "--run-config",
                    run_config,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=480,
                cwd=tmp_path,
            )
            out = run.stdout + run.stderr
            match = re.search(r"run\D{0,20}(\d{5,})", out)
            if match or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert match, out[-3000:]
        run_id = match.group(1)
        # `flwr run --stream` exits 0 even when the run failed: ask the SuperLink
        ls = subprocess.run(
            [str(BIN / "flwr"), "ls", "local-deployment", "--run-id", run_id, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        status = json.loads(ls.stdout)
        text = json.dumps(status)
        assert "finished:completed" in text, text + "\n" + out[-3000:]
        data = json.loads(report.read_text())
        assert [r["round"] for r in data["rounds"]] == [0, 1]
        assert sorted(data["clients"]) == ["0", "1"]
        assert all(c["epsilon"] <= 6.0 and c["rounds_trained"] == [1] for c in data["clients"].values())
    finally:
        for proc in reversed(procs):
            _stop(proc)
