"""Run a federated experiment with Flower's simulation runtime (one process per simulated client actor)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .settings import FedSettings


def run_federated(settings: FedSettings, num_cpus: int = 1, verbose: bool = False) -> dict[str, Any]:
    """Simulate ``settings.num_clients`` SuperNodes (``partition-id`` 0..n-1) and return the run report.

    ``num_cpus`` Ray CPUs, one per client actor (1 = clients run one after another). Flower's
    ``run_simulation`` is used (deprecated in favour of ``flwr run``, which needs an app folder; see README).
    """
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import make_server_app

    report_path = settings.report
    with tempfile.TemporaryDirectory() as tmp:
        if not report_path:
            report_path = str(Path(tmp) / "report.json")
        settings = FedSettings.from_mapping({**settings.to_record(), "report": report_path})
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        run_simulation(
            server_app=make_server_app(settings),
            client_app=client_app,
            num_supernodes=settings.num_clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": verbose},
            },
            verbose_logging=verbose,
        )
        path = Path(report_path)
        if not path.exists():
            raise RuntimeError(
                "the simulation ended without a report: see the log above for the ServerApp's error"
            )
        return json.loads(path.read_text())
