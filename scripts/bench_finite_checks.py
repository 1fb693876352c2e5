"""Cost of the NaN / Inf guard (``ortho_adapters.core.finite.check_finite``) next to the SVDs it protects.

LoRA-SB's gradient init on SmolLM2-135M checks the gradient sum ``G`` of each of the 7 projections of the
30 decoder layers (210 matrices) and then takes their SVD. This script times exactly that check
(``check_finite``: one fused ``torch.aminmax`` reduction per tensor) on random fp32 matrices of those shapes,
the plain ``torch.isfinite(t).all()`` alternative for reference, and ``torch.linalg.svd`` of the same
matrices, and prints one row per projection type plus the total (times summed over the layers; the checks'
times are the median of ``--repeats`` runs, the SVDs' of ``--svd-repeats``).

    OMP_NUM_THREADS=1 python scripts/bench_finite_checks.py [--layers 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ortho_adapters.core.finite import check_finite

# SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads / 3 key-value heads of 64.
SMOLLM2_135M_SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, matrices: list[torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median over ``repeats`` of the seconds ``fn`` takes over all ``matrices``."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for m in matrices:
            fn(m)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of the checks (median)")
    parser.add_argument("--svd-repeats", type=int, default=1, help="timed runs of the SVDs (median)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)

    def check(m: torch.Tensor) -> None:
        check_finite(m, step="initialize_lora_sb", statistic="gradient sum G = sum dy^T x", layer="bench")

    def isfinite_all(m: torch.Tensor) -> None:
        bool(torch.isfinite(m).all())

    def svd(m: torch.Tensor) -> None:
        torch.linalg.svd(m, full_matrices=False)

    rows = []
    for name, shape in SMOLLM2_135M_SHAPES.items():
        matrices = [torch.randn(shape, generator=g).to(device) for _ in range(args.layers)]
        for fn in (check, isfinite_all, svd):  # warm-up
            fn(matrices[0])
        rows.append(
            (
                name,
                f"{shape[0]}x{shape[1]}",
                len(matrices),
                _timed(check, matrices, device, args.repeats) * 1e3,
                _timed(isfinite_all, matrices, device, args.repeats) * 1e3,
                _timed(svd, matrices, device, args.svd_repeats) * 1e3,
            )
        )
    total = ("total", "", *(sum(r[i] for r in rows) for i in range(2, 6)))
    threads = torch.get_num_threads()
    print(f"device={device} torch={torch.__version__} threads={threads} layers={args.layers}")
    header = (
        f"{'projection':<11} {'shape':>9} {'n':>4} {'check ms':>9} {'isfinite ms':>11} {'SVD ms':>9} "
        f"{'check/SVD':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, shape, n, check_ms, isfinite_ms, svd_ms in rows + [total]:
        print(
            f"{name:<11} {shape:>9} {n:>4} {check_ms:>9.2f} {isfinite_ms:>11.2f} {svd_ms:>9.1f} "
            f"{check_ms / svd_ms:>10.2e}"
        )
    print(
        "check = ortho_adapters.core.finite.check_finite (as called by initialize_lora_sb); isfinite = "
        "bool(torch.isfinite(t).all()), for reference"
    )


if __name__ == "__main__":
    main()
