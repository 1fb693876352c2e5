"""LoRA-SB against LoRA end to end on the default SmolLM2 job: init, training loop, accuracy.

Runs ``ortho-adapters finetune --model smollm2 --task rotten_tomatoes`` (512 train, 1 epoch, the same
held-out items for every arm) once per arm, each in its own process, one after the other, and prints:

| arm | values | init s | Trainer loop s | train s incl. init | init share | accuracy +- SE |

Arms: PEFT LoRA r=8 and LoRA-SB r=16 with the job's defaults (``--init-svd auto``, 16 init samples),
plus LoRA-SB as it was before (``--init-svd full``, 64 init samples) for reference. SE is the binomial
standard error ``sqrt(p (1 - p) / n)`` of each accuracy. Run it on an idle machine: the seconds are
only comparable within one run.

``--profile``: instead, time one training step (forward, backward, AdamW) of LoRA r=8 and LoRA-SB r=16
on the same SmolLM2 batch, interleaved in one process (median of ``--steps``), and print the top ops of
``torch.profiler`` for each.

    python scripts/lora_sb_vs_lora.py               # about 10 min on 2 idle CPU cores
    python scripts/lora_sb_vs_lora.py --profile
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "LoRA r=8": ["--method", "lora"],
    "LoRA-SB r=16 (auto SVD, 16 init samples)": ["--method", "lora_sb"],
    "LoRA-SB r=16 (full SVD, 64 init samples; before)": [
        "--method", "lora_sb", "--init-svd", "full", "--init-samples", "64",
    ],
}  # fmt: skip


def run_arms(out: Path, extra: list[str]) -> list[str]:
    lines = [
        "| arm | values | init s | Trainer loop s | train s incl. init | init share | accuracy +- SE |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, flags in ARMS.items():
        arm_dir = out / label.split(" (")[0].replace(" ", "_").replace("=", "") / str(len(lines))
        command = [
            sys.executable, "-m", "ortho_adapters.cli", "finetune", "--model", "smollm2",
            "--task", "rotten_tomatoes", "--compare", "none", "--no-progress", "--no-save-adapter",
            "--output-dir", str(arm_dir), *flags, *extra,
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True)
        row = json.loads((arm_dir / "results.json").read_text())["rows"][0]
        init, total = row["extra"]["init_seconds"], row["train_seconds"]
        n, p = row["extra"]["n_eval"], row["accuracy"]
        lines.append(
            f"| {label} | {row['adapter_params']:,} | {init:.1f} | {total - init:.1f} | {total:.1f} | "
            f"{init / total:.1%} | {p:.3f} +- {math.sqrt(p * (1 - p) / n):.3f} |"
        )
        print(lines[-1], f"(process {time.perf_counter() - start:.0f} s)", flush=True)
    return lines


def profile_step(steps: int) -> None:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import profile

    import ortho_adapters
    from ortho_adapters.jobs.args import SMOLLM2_TARGETS
    from ortho_adapters.jobs.causal_lm import load_model

    torch.manual_seed(0)
    base, _ = load_model()
    ids = torch.randint(0, base.config.vocab_size, (8, 80))  # the job's batch size, a typical padded length
    configs = {
        "LoRA r=8": LoraConfig(r=8, lora_alpha=16, target_modules=SMOLLM2_TARGETS),
        "LoRA-SB r=16": ortho_adapters.LoraSBConfig(r=16, target_modules=SMOLLM2_TARGETS),
    }
    arms = {}
    for name, config in configs.items():
        model = get_peft_model(copy.deepcopy(base), config).train()
        arms[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))

    def step(model, optimizer):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(2):
        for arm in arms.values():
            step(*arm)
    for _ in range(steps):
        for name, arm in arms.items():
            start = time.perf_counter()
            step(*arm)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name}: median step {sorted(values)[len(values) // 2]:.3f} s over {steps} (threads: "
              f"{torch.get_num_threads()})")  # fmt: skip
    for name, arm in arms.items():
        with profile() as prof:
            step(*arm)
        print(
            f"\n{name}, one step:\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/lora_sb_vs_lora"))
    parser.add_argument("--profile", action="store_true", help="profile one training step of each instead")
    parser.add_argument("--steps", type=int, default=8, help="--profile: timed steps per arm")
    parser.add_argument("extra", nargs="*", help="more flags for every arm, after --, e.g. -- --n-eval 200")
    args = parser.parse_args()
    if args.profile:
        profile_step(args.steps)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    lines = run_arms(args.out, args.extra)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
