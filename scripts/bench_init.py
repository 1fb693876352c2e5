"""LoRA-SB init: the full SVD against the randomized one (``ortho_adapters.core.svd``), time and error.

Two tables, both measured side by side in one run:

1. Per matrix size (576 to 4096) and rank r in {8, 16, 64}, on update estimates shaped like LoRA-SB's
   (``-sign(Y^T X)`` over 2048 tokens with decaying scales; their spectrum is flatter than real ones, so
   the errors are pessimistic): seconds of the full SVD (one per shape, it does not depend on r) and of
   the randomized one, and the randomized path's error.
2. ``--smollm2``: the real update estimates of every target of SmolLM2-135M (the default causal-LM job's
   gradient pass, 16 Rotten Tomatoes samples): total SVD time of ``svd="full"`` and ``svd="auto"`` over
   the 210 layers, and the error distribution.

Errors of a rank-r ``B R A`` against the matrix ``dW``:

* ``excess``: ``||dW - B R A||_F / ||dW - [dW]_r||_F - 1``, how much worse than the best rank-r
  approximation ``[dW]_r`` (Eckart-Young) the fit is;
* ``oracle``: ``||B R A - [dW]_r||_F / ||[dW]_r||_F``, the distance to the exact truncation (LoRA-SB's
  oracle). It can be large only where ``s_r ~= s_{r+1}``: then the best rank-r subspace is itself
  ill-defined and the excess stays small.

On a machine with CUDA every row is also run on the GPU (``device`` column). Writes ``--out``
(``bench_init.md``, ``bench_init.json``, ``bench_init.png``).

    python scripts/bench_init.py                # table 1 (about 3 min on 2 idle CPU cores)
    python scripts/bench_init.py --smollm2      # both tables (about 4 min)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ortho_adapters.core.svd import OVERSAMPLE, POWER_ITERATIONS, randomized_svd, truncated_svds

SHAPES = [(576, 576), (1536, 576), (576, 1536), (1024, 1024), (2048, 2048), (4096, 4096)]
RANKS = (8, 16, 64)


def update_like(m: int, n: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """``-sign(Y^T X)``: a sign matrix of a sum of ``tokens`` outer products with decaying scales."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, tokens).sqrt()
    y = torch.randn(tokens, m, generator=g) * scales[:, None]
    return -torch.sign(y.t() @ torch.randn(tokens, n, generator=g))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, repeats: int, fn, *args, **kwargs):
    """Best wall time of ``repeats`` calls of ``fn(*args, **kwargs)`` and its last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def errors(matrix: torch.Tensor, full: tuple, fast: tuple, r: int) -> tuple[float, float]:
    """``(excess, oracle)`` of the rank-r ``fast`` factors against the exact ``full`` SVD (norms in fp64)."""
    a = matrix.double()
    u, s, vh = (t.double() for t in full)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    approx = (fast[0].double() * fast[1].double()) @ fast[2].double()
    excess = float((a - approx).norm() / (a - best).norm() - 1)
    return excess, float((approx - best).norm() / best.norm())


def size_table(devices: list[torch.device], shapes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for device in devices:
        for m, n in shapes:
            matrix = update_like(m, n).to(device)
            repeats = 3 if m * n <= 2048 * 2048 else 1
            full_s, full = _timed(device, repeats, torch.linalg.svd, matrix, full_matrices=False)
            for r in RANKS:
                randomized_svd(matrix, r)  # warm-up (first-call allocations)
                fast_s, fast = _timed(device, 3, randomized_svd, matrix, r)
                excess, oracle = errors(matrix, full, fast, r)
                gap = float(full[1][r - 1] / full[1][r])
                rows.append(
                    dict(
                        device=device.type,
                        shape=f"{m}x{n}",
                        r=r,
                        full_s=full_s,
                        randomized_s=fast_s,
                        speedup=full_s / fast_s,
                        excess=excess,
                        oracle=oracle,
                        gap=gap,
                    )
                )
                print(_row(rows[-1]), flush=True)
    return rows


def _row(row: dict) -> str:
    return (
        f"| {row['device']} | {row['shape']} | {row['r']} | {row['full_s']:.3f} | "
        f"{row['randomized_s']:.4f} | {row['speedup']:.0f}x | {row['excess']:.1e} | {row['oracle']:.1e} | "
        f"{row['gap']:.3f} |"
    )


def smollm2_update_estimates(samples: int = 16) -> dict[str, torch.Tensor]:
    """The default causal-LM job's LoRA-SB update estimates ``dW`` for every target (no SVD is run)."""
    from torch.utils.data import DataLoader

    import ortho_adapters
    from ortho_adapters.jobs.args import SMOLLM2_TARGETS, FinetuneArgs, resolve
    from ortho_adapters.jobs.causal_lm import load_model
    from ortho_adapters.jobs.lm_tasks import load_examples
    from ortho_adapters.jobs.scoring import LeftPadCollator, training_features
    from ortho_adapters.lora_sb import init as lora_sb_init

    captured: dict[str, torch.Tensor] = {}

    class Captured(Exception):
        pass

    def capture(matrices, ranks, **kwargs):  # stands in for the SVD step: keep dW, stop the init
        captured.update(matrices)
        raise Captured

    torch.manual_seed(0)
    model, tokenizer = load_model()
    args = resolve(FinetuneArgs(model="smollm2"))
    train, _ = load_examples(tokenizer, args.dataset, args.n_train, 10, args.max_length, 0)
    rows = [training_features(tokenizer, ex) for ex in train]
    loader = DataLoader(rows, batch_size=args.batch_size, collate_fn=LeftPadCollator(tokenizer.pad_token_id))
    config = ortho_adapters.LoraSBConfig(r=16, target_modules=SMOLLM2_TARGETS, init="gradient")
    model.train()
    original = lora_sb_init.truncated_svds
    lora_sb_init.truncated_svds = capture
    try:
        ortho_adapters.initialize_lora_sb(
            model,
            loader,
            config=config,
            num_samples=samples,
            learning_rate=2e-3,
            warmup_steps=4,
            progress=False,
            loss_check=False,
        )
    except Captured:
        pass
    finally:
        lora_sb_init.truncated_svds = original
    return captured


def smollm2_table(r: int = 16) -> list[dict]:
    estimates = smollm2_update_estimates()
    rows = []
    results = {}
    for method in ("full", "auto"):
        copies = {name: m.clone() for name, m in estimates.items()}
        start = time.perf_counter()
        results[method] = {
            name: (u, s, vh)
            for names, (us, ss, vhs) in truncated_svds(copies, dict.fromkeys(copies, r), method=method)
            for name, u, s, vh in zip(names, us, ss, vhs)
        }
        rows.append(dict(method=method, seconds=time.perf_counter() - start, layers=len(estimates)))
    excess, oracle = [], []
    for name, matrix in estimates.items():
        e, o = errors(matrix, results["full"][name], results["auto"][name], r)
        excess.append(e)
        oracle.append(o)
    excess_t, oracle_t = torch.tensor(excess), torch.tensor(oracle)
    rows[1].update(
        excess_median=float(excess_t.median()),
        excess_max=float(excess_t.max()),
        oracle_median=float(oracle_t.median()),
        oracle_max=float(oracle_t.max()),
    )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    squares = [
        row
        for row in rows
        if row["device"] == "cpu" and row["shape"].split("x")[0] == row["shape"].split("x")[1]
    ]
    sizes = sorted({int(row["shape"].split("x")[0]) for row in squares})
    full = [next(row["full_s"] for row in squares if row["shape"] == f"{s}x{s}") for s in sizes]
    left.plot(sizes, full, "k-o", label="full SVD (any r)")
    for r in RANKS:
        fast = [
            next(row["randomized_s"] for row in squares if row["shape"] == f"{s}x{s}" and row["r"] == r)
            for s in sizes
        ]
        left.plot(sizes, fast, "-o", label=f"randomized, r={r}")
        right.plot(
            sizes, [max(row["excess"], 1e-9) for row in squares if row["r"] == r], "-o", label=f"r={r}"
        )
    left.set(xscale="log", yscale="log", xlabel="n (n x n matrix)", ylabel="seconds (CPU)", title="SVD time")
    right.set(
        xscale="log",
        yscale="log",
        xlabel="n (n x n matrix)",
        ylabel="excess residual vs best rank r",
        title=f"randomized SVD error (p={OVERSAMPLE}, {POWER_ITERATIONS} power iterations)",
    )
    for ax in (left, right):
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", action="store_true", help="also the real SmolLM2 update estimates")
    parser.add_argument("--max-size", type=int, default=4096, help="skip shapes with a side above this")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_init"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    shapes = [shape for shape in SHAPES if max(shape) <= args.max_size]
    header = "| device | shape | r | full SVD s | randomized s | speedup | excess | oracle | s_r/s_r+1 |"
    print(
        f"threads: {torch.get_num_threads()}; randomized: oversample {OVERSAMPLE}, "
        f"{POWER_ITERATIONS} power iterations"
    )
    print(header + "\n|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = size_table(devices, shapes)
    lines = [header, "|---|---|---|---|---|---|---|---|---|", *map(_row, rows)]
    report = {"sizes": rows}
    if args.smollm2:
        real = smollm2_table()
        report["smollm2"] = real
        full, auto = real
        lines += [
            "",
            f"SmolLM2-135M, {auto['layers']} real update estimates, r=16:",
            "",
            "| svd | total s | excess median / max | oracle median / max |",
            "|---|---|---|---|",
            f"| full | {full['seconds']:.2f} | 0 | 0 |",
            f"| auto | {auto['seconds']:.2f} | {auto['excess_median']:.1e} / {auto['excess_max']:.1e} | "
            f"{auto['oracle_median']:.1e} / {auto['oracle_max']:.1e} |",
        ]
        print("\n".join(lines[-6:]))
    (args.out / "bench_init.md").write_text("\n".join(lines) + "\n")
    (args.out / "bench_init.json").write_text(json.dumps(report, indent=1))
    plot(rows, args.out / "bench_init.png")
    print(f"wrote {args.out}/bench_init.md, .json, .png")


if __name__ == "__main__":
    main()
