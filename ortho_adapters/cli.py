"""The ``ortho-adapters`` command: ``finetune`` (the main job) and ``fetch-assets`` (offline data).

ortho-adapters finetune                                   # MiniLM on Rotten Tomatoes, LoRA-SB vs baselines
ortho-adapters finetune --model smollm2 --task social_iqa --method lora_sb --compare zeroshot,lora
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .jobs.args import CAUSAL_LM_TASKS, MODELS, FinetuneArgs
from .jobs.federated import (
    add_credentials_parser,
    add_federated_parser,
    run_credentials_job,
    run_federated_job,
)
from .jobs.finetune import run_finetune


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v and v != "none"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ortho-adapters", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser(
        "finetune",
        help="fine-tune MiniLM (default) or SmolLM2-135M with an adapter against baselines (offline)",
        description="Defaults marked 'per model' are MiniLM's / SmolLM2's (see ortho_adapters/jobs/args.py).",
    )
    d = FinetuneArgs()
    ft.add_argument(
        "--method", default=d.method, help="lora_sb | lora_xs | lora | loldu | hut | vera | hira | tinylora"
    )
    ft.add_argument("--model", default=d.model, choices=sorted(MODELS))
    ft.add_argument(
        "--task",
        "--dataset",
        dest="dataset",
        default=d.dataset,
        help=f"minilm: rotten_tomatoes; smollm2: {', '.join(CAUSAL_LM_TASKS)}",
    )
    ft.add_argument("--r", type=int, default=None, help="rank of --method (default: the method's)")
    ft.add_argument(
        "--lr", type=float, default=None, help="learning rate of --method (default: the method's)"
    )
    ft.add_argument("--epochs", type=float, default=None, help="per model: 2 / 1")
    ft.add_argument("--batch-size", type=int, default=None, help="per model: 16 / 8")
    ft.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="sequences (causal LM)")
    ft.add_argument("--max-length", type=int, default=None, help="tokens, per model: 64 / 256")
    ft.add_argument("--n-train", type=int, default=None, help="per model: 2000 / 512")
    ft.add_argument("--n-eval", type=int, default=None, help="held-out examples, per model: 1000 / 500")
    ft.add_argument(
        "--targets", type=_csv, default=None, help="comma-separated module names (per model: query,value,"
        "output.dense / q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)",
    )  # fmt: skip
    ft.add_argument(
        "--compare",
        type=_csv,
        default=None,
        help="comparison arms, comma-separated: method names, 'baseline' (minilm), 'zeroshot' (smollm2), "
        "or 'none' (per model: baseline,lora / zeroshot,lora)",
    )
    ft.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    ft.add_argument("--init-samples", type=int, default=None, help="LoRA-SB gradient-init samples (256 / 16)")
    ft.add_argument(
        "--init-svd",
        choices=["auto", "full", "randomized"],
        default=d.init_svd,
        help="LoRA-SB gradient init's truncated SVD: randomized where the sketch is small (auto), or full",
    )
    ft.add_argument("--quantize", choices=["none", "4bit"], default=None, help="smollm2: nf4 4-bit base")
    ft.add_argument(
        "--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing"
    )
    ft.add_argument("--seed", type=int, default=d.seed)
    ft.add_argument("--output-dir", default=d.output_dir)
    ft.add_argument("--no-progress", dest="progress", action="store_false")
    ft.add_argument("--no-save-adapter", dest="save_adapter", action="store_false")
    sub.add_parser(
        "fetch-assets",
        help="install and cache the offline models and data sets (--only / --skip ASSET, --list, --force)",
    )
    add_federated_parser(sub)
    add_credentials_parser(sub)
    return parser


def parse_finetune_args(argv: list[str]) -> FinetuneArgs:
    """``FinetuneArgs`` from ``finetune`` flags (without the subcommand)."""
    args = build_parser().parse_args(["finetune", *argv])
    return FinetuneArgs(**{k: v for k, v in vars(args).items() if k != "command"})


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fetch-assets"]:  # its flags belong to ortho_adapters.fetch
        from .fetch import main as fetch_main

        return fetch_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "command"}
    if args.command == "federated":
        run_federated_job(values)
        return 0
    if args.command == "federated-credentials":
        run_credentials_job(values)
        return 0
    run_finetune(FinetuneArgs(**values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
