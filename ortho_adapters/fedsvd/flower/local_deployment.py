"""A Flower deployment on one machine: a SuperLink and SuperNodes as real processes, TLS and node auth on.

:class:`LocalDeployment` is what the README's deployment commands do, as code (the slow tests use it, and it
is a starting point for a real federation, where each SuperNode runs on its own machine):

* TLS: :func:`~.credentials.make_certificates` makes a CA and a server certificate for ``127.0.0.1`` /
  ``localhost``; the SuperLink serves with it, SuperNodes and the ``flwr`` CLI trust the CA.
* SuperNode authentication: the SuperLink runs with ``--enable-supernode-auth``; each node's P-384 key is
  registered with ``flwr supernode register`` (the registrations persist in the SuperLink's ``--database``)
  and the node starts with ``--auth-supernode-private-key``. A registered key keeps its node id across node
  restarts.
* ``insecure=True`` is the explicit opt-out (plain gRPC, no node auth), for debugging only.

In open-source Flower the Control API (``flwr run``, ``flwr supernode register``) has no user
authentication: anyone who reaches the SuperLink's port can start runs and register nodes. Restrict that
port (firewall, VPN) to the operators. Every process gets its own session, so :meth:`LocalDeployment.close`
also stops the ``flwr-clientapp`` / ``flower-superexec`` children it started; every wait is bounded.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from .credentials import make_certificates, make_node_key

CONNECTION = "local-deployment"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """``name`` from this interpreter's environment (``flower-superlink``, ``flwr``, ...), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the 'fed' extra (flwr)")
    return found


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> Optional[int]:
    """SIGTERM the process's session (it and the children it started, which may outlive it), SIGKILL after
    ``timeout``; its exit code."""

    def signal_session(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole session has exited
            pass

    signal_session(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_session(signal.SIGKILL)
        proc.wait(timeout=10)
    return proc.returncode


class LocalDeployment:
    """A SuperLink on ``127.0.0.1:<port>`` and SuperNodes ``0..num_nodes-1`` (see module docstring).

    Files live under ``workdir``: ``certs/``, ``keys/node-<i>[.pub]``, ``flwr_home/config.toml`` (the CLI's
    connection ``local-deployment``), ``superlink.db``, ``state/`` (each node's ``state-dir``: its privacy
    ledger) and ``logs/``.
    """

    def __init__(self, workdir: str | os.PathLike, num_nodes: int, insecure: bool = False) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.workdir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.insecure = insecure
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.logs = self.workdir / "logs"
        self.certs: dict[str, Path] = {}
        self.superlink: Optional[subprocess.Popen] = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self.node_ids: dict[int, int] = {}
        self._starts = 0
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.workdir / "flwr_home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    # -- processes -------------------------------------------------------------------------------------
    def _start(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        path = self.logs / f"{log_name}.{self._starts}.log"
        with path.open("w") as log:  # the child keeps its own descriptor; the parent's is closed here
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc.log_path = path  # type: ignore[attr-defined]
        return proc

    def start(self) -> LocalDeployment:
        """Make the credentials, write the CLI config and start the SuperLink."""
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f'address = "{self.address}"')
        cmd = [
            flower_bin("flower-superlink"),
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        cmd += ["--database", str(self.workdir / "superlink.db")]
        if self.insecure:
            lines.append("insecure = true")
            cmd.append("--insecure")
        else:
            self.certs = make_certificates(self.workdir / "certs")
            lines.append(f'root-certificates = "{self.certs["ca_cert"]}"')
            cmd += [
                "--ssl-ca-certfile",
                str(self.certs["ca_cert"]),
                "--ssl-certfile",
                str(self.certs["server_cert"]),
            ]
            cmd += ["--ssl-keyfile", str(self.certs["server_key"]), "--enable-supernode-auth"]
        (home / "config.toml").write_text("\n".join(lines) + "\n")
        self.superlink = self._start(cmd, "superlink")
        return self

    def node_key(self, i: int) -> tuple[Path, Path]:
        """Node ``i``'s key pair (made on first use)."""
        private = self.workdir / "keys" / f"node-{i}"
        if not private.exists():
            return make_node_key(private.parent, private.name)
        return private, private.with_name(private.name + ".pub")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment."""
        return subprocess.run(
            [flower_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def register(self, public_key: Path, wait_s: float = 90.0) -> int:
        """``flwr supernode register``: the node id of ``public_key`` (retried while the SuperLink starts)."""
        deadline = time.monotonic() + wait_s
        while True:
            out = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
            match = re.search(r'"node-id":\s*(\d+)', out.stdout)
            if match:
                return int(match.group(1))
            if time.monotonic() > deadline or (self.superlink and self.superlink.poll() is not None):
                raise RuntimeError(f"registering {public_key} failed:\n{out.stdout}\n{out.stderr}")
            time.sleep(2.0)

    def start_node(
        self,
        i: int,
        node_config: Optional[Mapping[str, object]] = None,
        private_key: Optional[Path] = None,
        register: bool = True,
        keyless: bool = False,
    ) -> subprocess.Popen:
        """Start SuperNode ``i`` (``partition-id=i``, ``state-dir=<workdir>/state``, plus ``node_config``).

        With TLS it authenticates with ``private_key`` (default: its own key, registered on first start when
        ``register``); ``keyless=True`` starts it without a key (the SuperLink must refuse it).
        """
        config = {
            "partition-id": i,
            "num-partitions": self.num_nodes,
            "state-dir": str(self.workdir / "state"),
        }
        config.update(node_config or {})
        cmd = [flower_bin("flower-supernode"), "--superlink", self.address, "--port", str(free_port())]
        cmd += ["--node-config", " ".join(f"{k}={_toml(v)}" for k, v in config.items())]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.certs["ca_cert"])]
            if private_key is None and not keyless:
                private_key, public_key = self.node_key(i)
                if register and i not in self.node_ids:
                    self.node_ids[i] = self.register(public_key)
            if not keyless:
                cmd += ["--auth-supernode-private-key", str(private_key)]
        proc = self._start(cmd, f"supernode-{i}")
        self.nodes[i] = proc
        return proc

    def wait_active(self, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
        """Whether the SuperNode ``proc`` was activated by the SuperLink (it logs its node id); ``False`` once
        it has exited (refused); ``TimeoutError`` if neither happens within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "SuperNode ID:" in proc.log_path.read_text(errors="replace"):  # type: ignore[attr-defined]
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.5)
        raise TimeoutError(f"SuperNode {proc.args} neither started nor exited in {timeout:.0f} s")

    def restart_node(self, i: int, wait_s: float = 180.0) -> subprocess.Popen:
        """Start SuperNode ``i`` again after a crash, retrying every 5 s while the SuperLink refuses it.

        The SuperLink counts the crashed process as online until its heartbeat window has passed (2 x 30 s in
        Flower 1.42) and refuses to activate the same key before that (the node exits 305, code 2004). In a
        real federation a supervisor does the same (e.g. systemd ``Restart=on-failure``, ``RestartSec=30``).
        """
        deadline = time.monotonic() + wait_s
        while True:
            proc = self.start_node(i)
            if self.wait_active(proc):
                return proc
            stop_process(self.nodes.pop(i))  # and the flower-superexec child it left behind
            if time.monotonic() > deadline:
                raise RuntimeError(f"SuperNode {i} was refused for {wait_s:.0f} s; see {proc.log_path}")  # type: ignore[attr-defined]
            time.sleep(5.0)

    def start_nodes(self) -> None:
        for i in range(self.num_nodes):
            self.start_node(i)

    def stop_node(self, i: int, kill: bool = False) -> Optional[int]:
        """Stop SuperNode ``i`` (``kill``: SIGKILL at once, as a crash); its exit code."""
        proc = self.nodes.pop(i)
        if kill and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            return proc.returncode
        return stop_process(proc)

    def close_nodes(self) -> None:
        """Stop every SuperNode process started so far (SuperLink keeps running)."""
        for i in list(self.nodes):
            self.stop_node(i)

    def close(self) -> None:
        self.close_nodes()
        if self.superlink is not None:
            stop_process(self.superlink)
            self.superlink = None

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- runs ------------------------------------------------------------------------------------------
    def run(self, app: str | os.PathLike, run_config: Mapping[str, object], timeout: float = 900.0) -> dict:
        """``flwr run <app> --stream`` with ``run_config``; wait for the end and return the run's JSON report.

        ``run_config`` must name a ``report`` path. ``flwr run --stream`` exits 0 (and ``flwr ls`` may say
        ``completed``) even when the ServerApp failed, so the run is judged by its report: a missing report is
        an error that quotes the end of the stream.
        """
        report = Path(str(run_config["report"]))
        report.unlink(missing_ok=True)
        config = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        deadline = time.monotonic() + 120
        while True:  # the SuperLink needs a moment before it accepts runs
            out = self.flwr("run", str(app), CONNECTION, "--stream", "--run-config", config, timeout=timeout)
            text = out.stdout + out.stderr
            started = re.search(r"run\D{0,20}\d{5,}", text)
            starting = re.search(r"unavailable|connect", text, re.IGNORECASE)  # SuperLink not up yet
            if started or not starting or time.monotonic() > deadline:
                break
            time.sleep(3.0)
        if not report.exists():
            raise RuntimeError(
                f"the run wrote no report {report}; end of `flwr run --stream`:\n{text[-4000:]}"
            )
        return json.loads(report.read_text())


def _toml(value: object) -> str:
    """A run-config / node-config value as Flower parses it (TOML-like)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"
