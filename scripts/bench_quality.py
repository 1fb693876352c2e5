"""Quality benchmark: methods x tasks -> held-out accuracy, adapter parameters, seconds per step, peak memory.

Every (method, task) cell trains in its own subprocess (so peak memory is that run's own), through the
same code as ``ortho-adapters finetune``. Writes a markdown table and a plot (accuracy vs trainable
parameters) to ``--out``.

    python scripts/bench_quality.py       # every method on Rotten Tomatoes
    python scripts/bench_quality.py --methods lora,lora_sb --n-train 500 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_METHODS = "lora,lora_xs,lora_sb,loldu,vera,tinylora,hut,hira"


def worker(args: argparse.Namespace) -> None:
    """Train one cell and print its result as one JSON line."""
    from ortho_adapters.jobs.args import FinetuneArgs
    from ortho_adapters.jobs.encoder import load_task, train_method

    ft = FinetuneArgs(
        method=args.method,
        dataset=args.task,
        epochs=args.epochs,
        n_train=args.n_train,
        n_eval=args.n_eval,
        targets=args.targets.split(","),
        compare=[],
        progress=False,
        output_dir=str(Path(args.out) / "runs"),
        seed=args.seed,
    )
    splits = load_task(ft)
    result = train_method(args.method, splits, ft)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    row = {
        "method": args.method,
        "task": args.task,
        "accuracy": result.accuracy,
        "adapter_params": result.adapter_params,
        "seconds_per_step": result.seconds_per_step,
        "peak_rss_mb": peak_rss_mb,
        "peak_cuda_mb": peak_cuda_mb,
        **result.extra,
    }
    print("RESULT " + json.dumps(row), flush=True)


def run_cell(method: str, task: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--task", task]
    for key in ("epochs", "n_train", "n_eval", "targets", "out", "seed"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method} on {task} failed:\n{proc.stderr[-4000:]}")
    row = json.loads(lines[-1].removeprefix("RESULT "))
    print(
        f"  {method:8s} {task}: acc {row['accuracy']:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True
    )
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | method | accuracy | adapter params | s / step | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['method']} | {r['accuracy']:.4f} | {r['adapter_params']:,} | "
            f"{r['seconds_per_step']:.3f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task in sorted({r["task"] for r in rows}):
        cells = [r for r in rows if r["task"] == task]
        ax.scatter([max(r["adapter_params"], 1) for r in cells], [r["accuracy"] for r in cells], label=task)
        for r in cells:
            ax.annotate(r["method"], (max(r["adapter_params"], 1), r["accuracy"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (head excluded)")
    ax.set_ylabel("held-out accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--tasks", default="rotten_tomatoes")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--targets", default="query,value,output.dense")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench_quality")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in args.tasks.split(","):
        print(f"{task}:", flush=True)
        for method in args.methods.split(","):
            rows.append(run_cell(method, task, args))
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "accuracy_vs_params.png")
    print(f"\n{table}\n\nwritten to {out}/results.md and {out}/accuracy_vs_params.png")


if __name__ == "__main__":
    main()
