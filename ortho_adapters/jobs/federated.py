"""The ``federated`` job: FedSVD or a control arm on MiniLM / Rotten Tomatoes in a Flower simulation.

ortho-adapters federated                                    # FedSVD, no DP, 6 clients, 3 a round, 10 rounds
ortho-adapters federated --arm ffa_orthonormal --epsilon 6  # DP-SGD (Opacus), epsilon 6 a client
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
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--verbose", action="store_true", help="Flower's and Ray's debug logs")
    return parser


def run_federated_job(values: dict[str, Any]) -> dict[str, Any]:
    """Run the simulation described by parsed ``federated`` flags; print a summary; return the report."""
    from ..fedsvd.flower.settings import FedSettings
    from ..fedsvd.flower.simulation import run_federated

    values = dict(values)
    num_cpus, verbose = values.pop("num_cpus", 1), values.pop("verbose", False)
    if not values.get("report"):
        eps = values.get("epsilon") or 0
        values["report"] = f"runs/federated/{values.get('arm', 'fedsvd')}_eps{eps:g}.json"
    settings = FedSettings.from_mapping(values)
    report = run_federated(settings, num_cpus=num_cpus, verbose=verbose)
    print(summary(report))
    return report


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


__all__ = ["add_federated_parser", "main", "run_federated_job", "summary"]
