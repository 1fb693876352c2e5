"""``ortho-adapters finetune``: the main job, for an encoder (MiniLM) or a causal LM (SmolLM2-135M).

Defaults (no arguments, no internet): MiniLM-L6 on Rotten Tomatoes (2,000 train / 1,000 held out, 64
tokens, 2 epochs), LoRA-SB with gradient init on the query, value, attention-output and FFN-output
projections (the official LoRA-SB GLUE targets), compared in the same run with a frozen-embedding
logistic-regression baseline and PEFT LoRA r=8 on the same targets.

``--model smollm2 --task T`` fine-tunes SmolLM2-135M-Instruct on Rotten Tomatoes or a task of
``ortho_adapters.tasks`` (:mod:`.causal_lm`); each arm runs in its own subprocess when there are
several, so every arm's peak RSS is its own. Results go to ``<output-dir>/results.md`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from .args import FinetuneArgs, resolve
from .methods import CAUSAL_LM, ZEROSHOT, get_method
from .report import RunResult, format_lm_table, format_table, is_main_process, write_results


def run_finetune(args: FinetuneArgs) -> list[RunResult]:
    """Run the main job and its comparison arms; print and save the results table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = resolve(args)
    if args.family == CAUSAL_LM:
        return run_causal_lm(args)
    return run_encoder(args)


def run_encoder(args: FinetuneArgs) -> list[RunResult]:
    """The MiniLM job: all arms in this process (it also runs under ``accelerate launch``)."""
    from .encoder import frozen_embedding_baseline, load_task, train_method

    get_method(args.method)
    for arm in args.compare:
        if arm == ZEROSHOT:
            raise ValueError("'zeroshot' is an arm of the causal-LM job; the encoder job compares 'baseline'")
        if arm != "baseline":
            get_method(arm)
    out = Path(args.output_dir)
    splits = load_task(args)
    rows: list[RunResult] = []
    if "baseline" in args.compare:
        rows.append(frozen_embedding_baseline(splits, args.seed))
    rows.append(train_method(args.method, splits, args, save_dir=out / args.method))
    for arm in args.compare:
        if arm not in ("baseline", args.method):
            rows.append(train_method(arm, splits, args))
    if is_main_process():
        table = format_table(rows)
        print(
            f"\n{args.model} on {args.dataset}: {len(splits['train'])} train / "
            f"{len(splits['test'])} held out, {args.epochs:g} epochs, "
            f"targets {','.join(args.targets)}\n{table}\n"
            f"adapter saved to {out / args.method}"
        )
        write_results(out, table, asdict(args), rows)
    return rows


def causal_lm_arms(args: FinetuneArgs) -> list[str]:
    """Arms in run order: ``zeroshot`` first if compared, then the method, then the other arms.

    ``--method zeroshot`` is allowed here (the zero-shot arm alone).
    """
    arms = [ZEROSHOT] if ZEROSHOT in args.compare else []
    arms += [a for a in [args.method, *args.compare] if a not in arms]
    for arm in arms:
        if arm == "baseline":
            raise ValueError("'baseline' is the encoder job's arm; the causal-LM job compares 'zeroshot'")
        if arm != ZEROSHOT:
            get_method(arm)
    return arms


NEGATED_FLAGS = ("progress", "save_adapter")  # on by default, turned off by --no-<flag>


def to_argv(args: FinetuneArgs) -> list[str]:
    """Command-line flags that reproduce ``args`` (a resolved copy) for ``ortho-adapters finetune``."""
    argv: list[str] = []
    for key, value in asdict(args).items():
        name = key.replace("_", "-")
        flag = "--task" if key == "dataset" else f"--{name}"
        if value is None:
            continue
        if isinstance(value, bool):
            if key in NEGATED_FLAGS:
                argv += [] if value else [f"--no-{name}"]
            else:
                argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [flag, ",".join(value) or "none"]
        else:
            argv += [flag, str(value)]
    return argv


def _run_arm_subprocess(arm: str, args: FinetuneArgs, out: Path) -> RunResult:
    """Run one arm as ``python -m ortho_adapters.cli finetune --method ARM --compare none``; read its row."""
    child = dataclasses.replace(
        args,
        method=arm,
        compare=[],
        r=args.r if arm == args.method else None,
        lr=args.lr if arm == args.method else None,
        output_dir=str(out / "arms" / arm),
    )
    subprocess.run([sys.executable, "-m", "ortho_adapters.cli", "finetune", *to_argv(child)], check=True)
    rows = json.loads((out / "arms" / arm / "results.json").read_text())["rows"]
    return RunResult.from_dict(rows[0])


def run_causal_lm(args: FinetuneArgs) -> list[RunResult]:
    """The SmolLM2 job: one arm in this process, or each of several arms in its own subprocess."""
    from .causal_lm import run_arm

    arms = causal_lm_arms(args)
    out = Path(args.output_dir)
    if len(arms) == 1:
        rows = [run_arm(arms[0], args, save_dir=out / arms[0])]
    else:
        rows = [_run_arm_subprocess(arm, args, out) for arm in arms]
    table = format_lm_table(rows)
    quant = ", 4-bit nf4 base" if args.quantize else ""
    n_train, n_eval = rows[0].extra.get("n_train", args.n_train), rows[0].extra.get("n_eval", args.n_eval)
    print(
        f"\n{args.model} on {args.dataset}: {n_train} train / {n_eval} held out, {args.epochs:g} epochs, "
        f"batch {args.batch_size}{quant}\n{table}\n"
    )
    write_results(out, table, asdict(args), rows)
    return rows
