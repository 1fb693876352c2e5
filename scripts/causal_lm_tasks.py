"""SmolLM2-135M-Instruct on every causal-LM task: zero-shot, PEFT LoRA r=8 and LoRA-SB, one table.

For each task runs the default job ``ortho-adapters finetune --model smollm2 --task T --n-eval 200``
(512 train, 1 epoch, all 7 projections; zero-shot and LoRA r=8 as its comparison arms) into ``OUT/T``
(skipped if ``OUT/T/results.json`` exists), then writes ``OUT/tasks.md`` / ``tasks.json`` and a bar chart
``OUT/tasks.png``: accuracy per arm on the same 200 held-out items, next to the task's chance level
(1 / number of choices) and its majority-answer rate on those items.

    OMP_NUM_THREADS=2 python scripts/causal_lm_tasks.py --out outputs/causal_lm_tasks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from ortho_adapters.jobs.args import CAUSAL_LM_TASKS

ARMS = ("zeroshot", "lora", "lora_sb")
LABELS = {"zeroshot": "zero-shot", "lora": "LoRA r=8", "lora_sb": "LoRA-SB r=16"}


def run_task(task: str, out: Path, n_eval: int, extra: list[str]) -> float:
    """Run the default SmolLM2 job on ``task`` unless its results exist; return its wall seconds."""
    folder = out / task
    if (folder / "results.json").is_file():
        return float("nan")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ortho_adapters.cli", "finetune", "--model", "smollm2", "--task", task]
    cmd += ["--n-eval", str(n_eval), "--no-progress", "--output-dir", str(folder), *extra]
    print(f"=== {time.strftime('%H:%M:%S')} {' '.join(cmd[3:])}", flush=True)
    with open(out / f"{task}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def reference_rates(task: str, n_eval: int) -> tuple[float, float]:
    """``(chance, majority)``: 1 / choices (mean over items), and the most common answer index's share of
    the held-out items (the majority label, or the most common answer position for multiple choice); both 0
    for ``arithmetic``, which is scored by generation."""
    from ortho_adapters.jobs.lm_tasks import get_task, load_rows

    _, test = load_rows(task, 0, n_eval, seed=0)
    if get_task(task).generative:
        return 0.0, 0.0
    chance = sum(1 / len(r["choices"]) for r in test) / len(test)
    majority = Counter(r["answer"] for r in test).most_common(1)[0][1] / len(test)  # label or position
    return chance, majority


def collect(out: Path, n_eval: int, tasks: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        found = {r["method"]: r for r in json.loads((out / task / "results.json").read_text())["rows"]}
        chance, majority = reference_rates(task, n_eval)
        row = {"task": task, "chance": chance, "majority": majority}
        for arm in ARMS:
            row[arm] = found[arm]["accuracy"] if arm in found else None
            row[f"{arm}_values"] = found[arm]["adapter_params"] if arm in found else None
            row[f"{arm}_train_s"] = found[arm]["train_seconds"] if arm in found else None
        rows.append(row)
    return rows


def table(rows: list[dict], n_eval: int) -> str:
    se = math.sqrt(0.25 / n_eval)
    lines = [
        "| task | chance | majority answer | zero-shot | LoRA r=8 | LoRA-SB r=16 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[a]:.3f}" if r[a] is not None else "-" for a in ARMS]
        lines.append(f"| {r['task']} | {r['chance']:.3f} | {r['majority']:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{n_eval} held-out items per task; one accuracy's standard error is at most {se:.3f}.")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.25
    for k, arm in enumerate(ARMS):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r[arm] or 0.0 for r in rows], width, label=LABELS[arm])
    for i, r in enumerate(rows):
        ax.hlines(r["chance"], i - 1.5 * width, i + 1.5 * width, colors="k", linestyles="dashed")
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows], rotation=20)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("SmolLM2-135M-Instruct, 512 train / 200 held out, 1 epoch (dashed: chance)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/causal_lm_tasks"))
    parser.add_argument("--tasks", nargs="+", default=list(CAUSAL_LM_TASKS), choices=CAUSAL_LM_TASKS)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more finetune flags, after --")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    seconds = {task: run_task(task, args.out, args.n_eval, extra) for task in args.tasks}
    rows = collect(args.out, args.n_eval, args.tasks)
    for row in rows:
        row["job_wall_s"] = seconds[row["task"]]
    text = table(rows, args.n_eval)
    (args.out / "tasks.md").write_text(text + "\n")
    (args.out / "tasks.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "tasks.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
