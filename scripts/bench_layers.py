"""Per-layer forward+backward time: HUT (materialize / factored / auto) vs PEFT LoRA vs the frozen linear.

Every arm wraps the same ``nn.Linear(n, m)`` and is timed side by side in one process on the same inputs:
``y = layer(x); y.backward(dy)`` with ``x`` requiring grad (a layer inside a network), after warm-up, median
of ``--repeats`` runs, with a fixed number of CPU threads (``torch.set_num_threads``). Prints a markdown
table with each arm's time and its ratio to the frozen layer, and the ratios HUT's FLOP model
(:func:`ortho_adapters.hut.path_costs`) predicts.

    python scripts/bench_layers.py                       # m = n = 1024, r = 8, T = 512 .. 8192
    python scripts/bench_layers.py --m 4096 --n 4096 --r 16 --tokens 256 1024 --threads 4
    python scripts/bench_layers.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import peft
import torch
from peft import get_peft_model
from torch import nn

import ortho_adapters
from ortho_adapters.hut import path_costs

ARMS = ("frozen", "lora", "hut_materialize", "hut_factored", "hut_auto")


def build_arms(args: argparse.Namespace) -> dict[str, nn.Module]:
    """One module per arm, all wrapping copies of the same frozen linear layer."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(args.n, args.m).to(device=args.device, dtype=dtype).requires_grad_(False)
    arms: dict[str, nn.Module] = {}
    for name in args.arms:
        layer = nn.Sequential(nn.Linear(args.n, args.m))
        layer[0].load_state_dict(base.state_dict())
        layer = layer.to(device=args.device, dtype=dtype).requires_grad_(False)
        if name == "lora":
            config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["0"])
            layer = get_peft_model(layer, config)
        elif name.startswith("hut_"):
            execution = name.removeprefix("hut_")
            layer = get_peft_model(
                layer, ortho_adapters.HUTConfig(r=args.r, target_modules=["0"], execution=execution)
            )
        if name != "frozen":
            with torch.no_grad():  # non-zero factors, as during training
                for p in layer.parameters():
                    if p.requires_grad:
                        p.normal_(0.0, 0.02)
        arms[name] = layer
    return arms


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(steps: dict[str, Callable[[], None]], device: str, warmup: int, repeats: int):
    """Median seconds per arm; each repeat times every arm once in turn, so load drift hits all alike.

    Each timed call follows an untimed one of the same arm, so that one arm's allocations (the factored
    path's T x r x n temporaries) do not leave the caching allocator cold for the next arm.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            step()
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """One training-like step of ``layer``: forward, backward to ``x`` and the trainable tensors."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(dy)

    return step


def bench(args: argparse.Namespace) -> list[dict[str, float]]:
    arms = build_arms(args)
    dtype = getattr(torch, args.dtype)
    rows = []
    for tokens in args.tokens:
        g = torch.Generator(device=args.device).manual_seed(tokens)
        x = torch.randn(tokens, args.n, generator=g, device=args.device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, args.m, generator=g, device=args.device, dtype=dtype)
        steps = {name: make_step(layer, x, dy) for name, layer in arms.items()}
        row = {"tokens": tokens, **time_interleaved(steps, args.device, args.warmup, args.repeats)}
        rows.append(row)
        print(f"T={tokens}: " + ", ".join(f"{k}={v * 1e3:.1f} ms" for k, v in row.items() if k != "tokens"))
    return rows


def predicted_ratios(tokens: int, args: argparse.Namespace) -> dict[str, float]:
    """Multiply-adds of each HUT path over the frozen layer's ``2 T m n`` (forward + dx)."""
    frozen = 2 * tokens * args.m * args.n
    costs = path_costs(tokens, args.m, args.n, args.r, True, True)
    lora = tokens * args.r * (args.m + args.n) * 3  # forward 1x, backward 2x of the two thin GEMMs
    return {"lora": 1 + lora / frozen, **{f"hut_{k}": v / frozen for k, v in costs.items()}}


def markdown(rows: list[dict[str, float]], args: argparse.Namespace) -> str:
    arms = [a for a in args.arms if a != "frozen"]
    head = ["T", "frozen ms", *(f"{a} ms (x frozen)" for a in arms), "FLOP model: lora / hut_mat / hut_fac"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        frozen = row["frozen"]
        cells = [str(int(row["tokens"])), f"{frozen * 1e3:.1f}"]
        cells += [f"{row[a] * 1e3:.1f} ({row[a] / frozen:.2f})" for a in arms]
        model = predicted_ratios(int(row["tokens"]), args)
        cells.append(f"{model['lora']:.2f} / {model['hut_materialize']:.2f} / {model['hut_factored']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--m", type=int, default=1024, help="out_features")
    parser.add_argument("--n", type=int, default=1024, help="in_features")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (CPU; 1 on a shared box)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if "frozen" not in args.arms:
        args.arms = ["frozen", *args.arms]
    torch.set_num_threads(args.threads)
    rows = bench(args)
    print(
        f"\nm={args.m} n={args.n} r={args.r} {args.dtype} on {args.device} "
        f"({torch.get_num_threads()} threads), median of {args.repeats}, "
        "forward+backward (dx and adapter grads)\n"
    )
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
