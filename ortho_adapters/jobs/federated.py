"""The ``federated`` job: FedSVD or a control arm on MiniLM / Rotten Tomatoes in a Flower simulation.

ortho-adapters federated                                    # FedSVD, no DP, 6 clients, 3 a round, 10 rounds
ortho-adapters federated --arm ffa_orthonormal --epsilon 6  # DP-SGD (Opacus), epsilon 6 a client
ortho-adapters federated --deployment runs/deploy --num-clients 3 --secure-aggregation
                            # real SuperLink + SuperNodes on 127.0.0.1: TLS, node auth, SecAgg+
ortho-adapters federated-credentials --out certs --hosts superlink.example.org --nodes 6
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Optional

from ..fedsvd.task import ARMS


def add_federated_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``federated`` subcommand (its flags are :class:`FedSettings` fields) to ``sub``."""
    from ..fedsvd.flower.settings import FedSettings

    parser = sub.add_parser(
        "federated",
        help="federated fine-tuning (FedSVD, FFA-LoRA, FedAvg-LoRA) in a Flower simulation, optional DP-SGD",
        description="Simulates --num-clients Flower SuperNodes (Dirichlet label skew); writes a JSON report.",
    )
    helps = {
        "arm": f"one of {', '.join(ARMS)}",
        "epsilon": "target epsilon per client for the whole run (0 = no DP)",
        "planned_rounds": "rounds each client's noise is calibrated for (0 = expected participation)",
        "report": "JSON report path (default: runs/federated/<arm>_eps<epsilon>.json)",
        "targets": "comma-separated module names",
        "train_head": "also train (and average) the classification head",
        "experiment_id": "key of each client's privacy ledger (nodes with a state-dir): runs of one "
        "experiment share one budget",
        "checkpoint_dir": "server checkpoint after every round; a run with the same settings resumes there",
        "secure_aggregation": "SecAgg+: the server learns only each round's weighted average "
        "(>= 3 clients a round)",
    }
    skip = {"progress", "node_wait_s"}
    for f in dataclasses.fields(FedSettings):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(
                flag, default=f.default, action=argparse.BooleanOptionalAction, help=helps.get(f.name)
            )
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=helps.get(f.name))
    parser.add_argument("--num-cpus", type=int, default=1, help="Ray CPUs (client actors running at once)")
    parser.add_argument(
        "--deployment",
        metavar="DIR",
        default=None,
        help="run as a real Flower deployment on 127.0.0.1 (SuperLink + --num-clients SuperNodes, files in "
        "DIR) instead of a simulation; TLS and SuperNode authentication are on",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="with --deployment: plain gRPC, no node auth (debugging only)"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--verbose", action="store_true", help="Flower's and Ray's debug logs")
    return parser


def run_federated_job(values: dict[str, Any]) -> dict[str, Any]:
    """Run the simulation described by parsed ``federated`` flags; print a summary; return the report."""
    from ..fedsvd.flower.settings import FedSettings
    from ..fedsvd.flower.simulation import run_federated

    values = dict(values)
    num_cpus, verbose = values.pop("num_cpus", 1), values.pop("verbose", False)
    deployment, insecure = values.pop("deployment", None), values.pop("insecure", False)
    if not values.get("report"):
        eps = values.get("epsilon") or 0
        values["report"] = f"runs/federated/{values.get('arm', 'fedsvd')}_eps{eps:g}.json"
    settings = FedSettings.from_mapping(values)
    if deployment:
        report = run_local_deployment(settings, deployment, insecure)
    else:
        report = run_federated(settings, num_cpus=num_cpus, verbose=verbose)
    print(summary(report))
    return report


def run_local_deployment(settings: Any, workdir: str, insecure: bool = False) -> dict[str, Any]:
    """Run ``settings`` on a :class:`~..fedsvd.flower.local_deployment.LocalDeployment` in ``workdir``."""
    from pathlib import Path

    from ..fedsvd.flower.local_deployment import LocalDeployment

    app = Path(__file__).resolve().parents[2] / "examples" / "fedsvd_app"
    if not app.exists():
        raise FileNotFoundError(f"the Flower app folder {app} is missing (it ships with the source tree)")
    record = settings.to_record()
    record["report"] = str(Path(record["report"]).resolve())
    if record["checkpoint_dir"]:
        record["checkpoint_dir"] = str(Path(record["checkpoint_dir"]).resolve())
    with LocalDeployment(workdir, settings.num_clients, insecure=insecure) as dep:
        dep.start_nodes()
        print(f"SuperLink {dep.address} ({'insecure' if insecure else 'TLS, node auth'}); logs in {dep.logs}")
        return dep.run(app, record)


def add_credentials_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``federated-credentials`` subcommand: a CA, a SuperLink certificate and SuperNode keys."""
    parser = sub.add_parser(
        "federated-credentials",
        help="TLS certificates for a SuperLink and P-384 keys for SuperNode authentication",
        description="Writes ca.crt, ca.key, server.pem, server.key and keys/node-<i>[.pub] to --out.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--hosts", default="localhost,127.0.0.1", help="comma-separated DNS names / IPs of the SuperLink"
    )
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make")
    parser.add_argument("--days", type=int, default=365, help="certificate validity")
    return parser


def run_credentials_job(values: dict[str, Any]) -> dict[str, Any]:
    """Make the files named by parsed ``federated-credentials`` flags; print where they are."""
    from ..fedsvd.flower.credentials import make_certificates, make_node_key

    hosts = [h for h in values["hosts"].split(",") if h]
    paths = make_certificates(values["out"], hosts, days=values["days"])
    for i in range(values["nodes"]):
        paths[f"node-{i}"] = make_node_key(f"{values['out']}/keys", f"node-{i}")[0]
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


def summary(report: dict[str, Any]) -> str:
    """A short text summary: final accuracy and each client's rounds and epsilon."""
    s = report["settings"]
    lines = [
        f"{s['arm']} (epsilon {s['epsilon'] or 'none'}): accuracy {report['final_accuracy']:.4f} after "
        f"{s['rounds']} rounds; report {s['report']}"
    ]
    for cid, c in report["clients"].items():
        eps = (
            f", epsilon {c['epsilon']:.3f} (sigma {c['noise_multiplier']:.3f}, q {c['sample_rate']:.4f})"
            if "epsilon" in c
            else ""
        )
        lines.append(
            f"  client {cid}: trained rounds {c['rounds_trained']}, refused {c['rounds_refused']}{eps}"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ortho-adapters")
    add_federated_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["federated", *(sys.argv[1:] if argv is None else argv)])
    run_federated_job({k: v for k, v in vars(args).items() if k != "command"})
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "add_credentials_parser",
    "add_federated_parser",
    "main",
    "run_credentials_job",
    "run_federated_job",
    "run_local_deployment",
    "summary",
]
