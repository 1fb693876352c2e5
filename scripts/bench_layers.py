"""Per-layer forward+backward time and memory of every adapter, as ratios to the frozen linear layer.

Every arm wraps a copy of the same ``nn.Linear(n, m)`` and is timed side by side in one process on the
same inputs: ``y = layer(x); y.backward(dy)`` with ``x`` requiring grad (a layer inside a network), after
warm-up, each repeat timing every arm once in turn; the table gives the median time, its ratio to the
frozen layer (median of the per-repeat ratios) and to PEFT LoRA at the same rank, with a fixed number of
CPU threads (``torch.set_num_threads``), timed in process CPU time on the CPU by default (``--clock cpu``:
a shared machine's other jobs then only slow the arms through caches and memory bandwidth, not by
descheduling) and in wall time after a synchronize on CUDA. Arms:

* ``fused_lora_sb``, ``fused_loldu``, ``fused_fedsvd``: our layers as users get them, where they dispatch
  to the fused Triton kernels (only where ``kernels_available(device, dtype)`` and the dispatch accepts
  the layer; otherwise the row says why it is n/a),
* ``lora_sb``, ``loldu``, ``fedsvd``, ``hut_auto`` / ``hut_materialize`` / ``hut_factored``: our PyTorch
  paths (fused kernels switched off with ``ORTHO_ADAPTERS_DISABLE_KERNELS=1`` while they run),
* ``lora``: PEFT LoRA; ``tinylora``: PEFT TinyLoRA (``B R(v) A`` with frozen SVD factors, LoRA-SB's peer).

Memory: the values autograd saves for backward (``saved_tensors_hooks``; weights and buffers excluded,
each storage counted once), in units of ``T r``; "held" is that plus the output, i.e. the activation
memory a layer keeps alive between its forward and backward, as a ratio to the frozen layer (which keeps
only its output). On CUDA also the step's peak allocation above what was allocated before it
(``torch.cuda.max_memory_allocated``), as a ratio to the frozen layer's.

``--e2e`` adds one training step (forward, backward, AdamW) of SmolLM2-135M (offline cache) with LoRA-SB
against PEFT LoRA at the same rank on every linear layer of the decoder.

    python scripts/bench_layers.py                                    # m = n = 1024, r = 8, T = 512 .. 8192
    python scripts/bench_layers.py --m 2048 --n 2048 --r 16 64 --tokens 2048 --threads 1 --e2e
    python scripts/bench_layers.py --m 4096 --n 4096 --r 16 64 --tokens 4096 8192 16384 \\
        --device cuda --dtype bfloat16 --e2e
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import peft
import torch
from peft import get_peft_model
from torch import nn

import ortho_adapters
from ortho_adapters.hut import path_costs

ARMS = (
    "frozen",
    "fused_lora_sb",
    "fused_loldu",
    "fused_fedsvd",
    "lora_sb",
    "loldu",
    "fedsvd",
    "hut_auto",
    "hut_materialize",
    "hut_factored",
    "lora",
    "tinylora",
)
DEFAULT_ARMS = tuple(arm for arm in ARMS if arm not in ("hut_materialize", "hut_factored"))
LABELS = {
    "frozen": "frozen base linear",
    "fused_lora_sb": "LoRA-SB, fused Triton path",
    "fused_loldu": "LoLDU, fused Triton path",
    "fused_fedsvd": "FedSVD, fused Triton path",
    "lora_sb": "LoRA-SB, PyTorch path",
    "loldu": "LoLDU, PyTorch path",
    "fedsvd": "FedSVD, PyTorch path",
    "hut_auto": "HUT (auto), PyTorch path",
    "hut_materialize": "HUT materialize, PyTorch path",
    "hut_factored": "HUT factored, PyTorch path",
    "lora": "PEFT LoRA",
    "tinylora": "PEFT TinyLoRA",
}
DISABLE_ENV = "ORTHO_ADAPTERS_DISABLE_KERNELS"
OUT_DIR = Path("outputs/bench_layers")


# ----- machine ---------------------------------------------------------------------------------------
def machine_name(device: str) -> str:
    """The card (CUDA) or the CPU model from /proc/cpuinfo, with the thread count torch uses."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    threads = torch.get_num_threads()
    return f"{model} ({os.cpu_count()} cores), {threads} torch thread(s), torch {torch.__version__}"


# ----- the fused arm ---------------------------------------------------------------------------------
def fused_status(device: str, dtype: torch.dtype) -> str | None:
    """``None`` when the fused kernels run here, else why the fused row is n/a."""
    try:
        from ortho_adapters.kernels import kernels_available
    except ImportError as err:
        return f"n/a: ortho_adapters.kernels not importable ({err})"
    if not torch.device(device).type == "cuda":
        return "n/a: no CUDA"
    if not kernels_available(torch.device(device), dtype):
        return "n/a: kernels unavailable (Triton missing, dtype, or disabled)"
    return None


def fused_declined(layer: nn.Module, x: torch.Tensor) -> str | None:
    """Why the adapter layer of a fused arm would not take the fused path for ``x`` (``None``: it does)."""
    from ortho_adapters.kernels.dispatch import plan_fused

    tuner = layer.base_model.model[0]
    return None if plan_fused(tuner, x, (), {}) is not None else "n/a: dispatch declined the fused path"


# ----- building the arms -----------------------------------------------------------------------------
def adapter_config(name: str, r: int):
    """The PEFT config of an arm at rank ``r`` on the layer named ``"0"``."""
    target = ["0"]
    name = name.removeprefix("fused_")
    if name == "lora_sb":
        return ortho_adapters.LoraSBConfig(r=r, target_modules=target)
    if name == "loldu":
        return ortho_adapters.LoLDUConfig(r=r, target_modules=target)
    if name == "fedsvd":
        return ortho_adapters.FedSVDConfig(r=r, target_modules=target)
    if name.startswith("hut_"):
        return ortho_adapters.HUTConfig(r=r, target_modules=target, execution=name.removeprefix("hut_"))
    if name == "lora":
        return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target)
    if name == "tinylora":
        return peft.TinyLoraConfig(r=r, target_modules=target, init_weights="uniform")
    raise ValueError(f"unknown arm {name!r}")


def build_arms(args: argparse.Namespace, r: int) -> dict[str, nn.Module]:
    """One module per arm (fp32 creation, then cast), all wrapping copies of the same frozen linear."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(args.n, args.m).requires_grad_(False)
    arms: dict[str, nn.Module] = {}
    for name in args.arms:
        layer = nn.Sequential(nn.Linear(args.n, args.m))
        layer[0].load_state_dict(base.state_dict())
        layer.requires_grad_(False)
        if name.startswith("fused_") and args.fused_status is not None:
            continue
        if name != "frozen":
            layer = get_peft_model(layer, adapter_config(name, r))
            with torch.no_grad():  # non-zero trainable factors, as during training
                for p in layer.parameters():
                    if p.requires_grad:
                        p.normal_(0.0, 0.02)
        layer = layer.to(device=args.device, dtype=dtype)
        arms[name] = layer
    return arms


# ----- timing and memory -----------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def pytorch_path(enabled: bool) -> Iterator[None]:
    """Switch the fused kernels off (``ORTHO_ADAPTERS_DISABLE_KERNELS=1``) while an arm that is not a
    ``fused_*`` arm runs, so that our PyTorch rows measure the PyTorch path even where kernels dispatch."""
    old = os.environ.get(DISABLE_ENV)
    if enabled:
        os.environ[DISABLE_ENV] = "1"
    try:
        yield
    finally:
        if enabled:
            if old is None:
                os.environ.pop(DISABLE_ENV, None)
            else:
                os.environ[DISABLE_ENV] = old


def time_interleaved(
    steps: dict[str, Callable[[], None]],
    device: str,
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
):
    """Per-repeat seconds of each arm; each repeat times every arm once in turn, so load drift hits all
    alike. On CUDA each timed call follows an untimed one of the same arm, so that one arm's allocations
    (the factored path's T x r x n temporaries) do not leave the caching allocator cold for the next arm."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.startswith("cuda"):
                step()
            _sync(device)
            start = clock()
            step()
            _sync(device)
            times[name].append(clock() - start)
    return times


def make_step(name: str, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """One training-like step of ``layer``: forward, backward to ``x`` and the trainable tensors."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        with pytorch_path(not name.startswith("fused_")):
            layer(x).backward(dy)

    return step


def saved_activation_values(layer: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """``(saved, output)``: values autograd keeps for backward in one forward of ``layer`` (each storage
    once, weights and buffers excluded) and the values of the output."""
    owned = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    return sum(seen.values()), y.numel()


def cuda_peak_bytes(step: Callable[[], None], device: str) -> int:
    """Peak allocation during one step above what was allocated before it."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench(args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    rows = []
    for r in args.r:
        arms = build_arms(args, r)
        for tokens in args.tokens:
            g = torch.Generator(device=args.device).manual_seed(tokens)
            x = torch.randn(tokens, args.n, generator=g, device=args.device, dtype=dtype, requires_grad=True)
            dy = torch.randn(tokens, args.m, generator=g, device=args.device, dtype=dtype)
            declined = {n: fused_declined(layer, x) for n, layer in arms.items() if n.startswith("fused_")}
            live = {n: layer for n, layer in arms.items() if declined.get(n) is None}
            steps = {name: make_step(name, layer, x, dy) for name, layer in live.items()}
            times = time_interleaved(steps, args.device, args.warmup, args.repeats, args.clock_fn)
            for name in args.arms:
                row: dict = {"arm": name, "m": args.m, "n": args.n, "r": r, "tokens": tokens}
                if name not in live:
                    row["status"] = declined.get(name) or args.fused_status
                    rows.append(row)
                    continue
                with pytorch_path(not name.startswith("fused_")):
                    saved, out = saved_activation_values(arms[name], x)
                row.update(
                    status="ok",
                    seconds=statistics.median(times[name]),
                    x_frozen=statistics.median(t / f for t, f in zip(times[name], times["frozen"])),
                    saved_values=saved,
                    output_values=out,
                )
                if "lora" in times:
                    row["x_lora"] = statistics.median(t / f for t, f in zip(times[name], times["lora"]))
                if args.device.startswith("cuda"):
                    row["peak_bytes"] = cuda_peak_bytes(steps[name], args.device)
                rows.append(row)
            frozen = next(
                row for row in rows if row["arm"] == "frozen" and row["r"] == r and row["tokens"] == tokens
            )
            for row in rows:
                if row["r"] == r and row["tokens"] == tokens and row["status"] == "ok":
                    row["held_x_frozen"] = (row["saved_values"] + row["output_values"]) / (
                        frozen["saved_values"] + frozen["output_values"]
                    )
                    if "peak_bytes" in row:
                        row["peak_x_frozen"] = row["peak_bytes"] / frozen["peak_bytes"]
            print(
                f"r={r} T={tokens}: "
                + ", ".join(f"{k}={statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()),
                flush=True,
            )
        del arms
    return rows


# ----- end-to-end step on SmolLM2 --------------------------------------------------------------------
E2E_LABELS = {"lora_sb": "LoRA-SB (fused kernels where they dispatch)", "lora": "PEFT LoRA"}
E2E_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def e2e_bench(args: argparse.Namespace) -> list[dict]:
    """One AdamW training step of SmolLM2-135M with LoRA-SB vs PEFT LoRA at rank ``args.e2e_r``."""
    from ortho_adapters.data import load_smollm2

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.e2e_batch, args.e2e_seq), generator=g).to(args.device)
    arms = {
        "lora_sb": ortho_adapters.LoraSBConfig(r=args.e2e_r, target_modules=E2E_TARGETS),
        "lora": peft.LoraConfig(r=args.e2e_r, lora_alpha=2 * args.e2e_r, target_modules=E2E_TARGETS),
    }
    models, optims, steps = {}, {}, {}
    for name, config in arms.items():
        base, _ = load_smollm2(torch.float32)
        model = get_peft_model(base, config).to(device=args.device, dtype=dtype)
        model.train()
        if name == "lora_sb":  # non-zero R, as during training
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.normal_(0.0, 0.02)
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model: nn.Module = model, optim: torch.optim.Optimizer = optim) -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        models[name], optims[name], steps[name] = model, optim, step
    times = time_interleaved(steps, args.device, 1, args.e2e_repeats, args.clock_fn)
    rows = []
    for name, model in models.items():
        owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, owned: set[int] = owned, seen: dict[int, int] = seen) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in owned:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        del loss
        rows.append(
            {
                "arm": name,
                "seconds": statistics.median(times[name]),
                "x_lora": statistics.median(t / f for t, f in zip(times[name], times["lora"])),
                "saved_bytes": sum(seen.values()),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
        )
    return rows


# ----- reporting -------------------------------------------------------------------------------------
def predicted_ratios(tokens: int, m: int, n: int, r: int) -> dict[str, float]:
    """Multiply-adds of each HUT path over the frozen layer's ``2 T m n`` (forward + dx)."""
    frozen = 2 * tokens * m * n
    costs = path_costs(tokens, m, n, r, True, True)
    lora = tokens * r * (m + n) * 3  # forward 1x, backward 2x of the two thin GEMMs
    return {"lora": 1 + lora / frozen, **{f"hut_{k}": v / frozen for k, v in costs.items()}}


def markdown(rows: list[dict], args: argparse.Namespace, machine: str) -> str:
    cuda = args.device.startswith("cuda")
    head = [
        "layer",
        "T",
        "r",
        "fwd+bwd ms",
        "x frozen",
        "x PEFT LoRA",
        "saved values (x T r)",
        "held x frozen",
    ]
    if cuda:
        head.append("peak x frozen")
    lines = [
        f"m = {args.m}, n = {args.n}, {args.dtype} on {machine}; median of {args.repeats} interleaved "
        f"repeats of forward+backward (dx and adapter grads), {args.clock} time.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [LABELS[row["arm"]], str(row["tokens"]), str(row["r"])]
        if row["status"] != "ok":
            cells += [row["status"]] + ["n/a"] * (len(head) - 4)
        else:
            tr = row["tokens"] * row["r"]
            cells += [
                f"{row['seconds'] * 1e3:.1f}",
                f"{row['x_frozen']:.2f}",
                f"{row['x_lora']:.2f}" if "x_lora" in row else "",
                f"{row['saved_values']:,} ({row['saved_values'] / tr:.2f})",
                f"{row['held_x_frozen']:.2f}",
            ]
            if cuda:
                cells.append(f"{row['peak_x_frozen']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if any(row["arm"].startswith("hut_") for row in rows):
        lines += ["", "FLOP model (x frozen): LoRA / HUT materialize / HUT factored", ""]
        for r in args.r:
            for tokens in args.tokens:
                p = predicted_ratios(tokens, args.m, args.n, r)
                ratios = f"{p['lora']:.2f} / {p['hut_materialize']:.2f} / {p['hut_factored']:.2f}"
                lines.append(f"- T={tokens}, r={r}: {ratios}")
    return "\n".join(lines)


def e2e_markdown(rows: list[dict], args: argparse.Namespace, machine: str) -> str:
    lines = [
        f"SmolLM2-135M, one AdamW step (forward, backward, update), batch {args.e2e_batch} x {args.e2e_seq} "
        f"tokens, r = {args.e2e_r} on {', '.join(E2E_TARGETS)}, {args.dtype} on {machine}; "
        f"median of {args.e2e_repeats}, {args.clock} time.",
        "",
        "| method | step s | x PEFT LoRA | saved activations MiB | trainable params |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {E2E_LABELS[row['arm']]} | {row['seconds']:.2f} | {row['x_lora']:.2f} | "
            f"{row['saved_bytes'] / 2**20:.1f} | {row['trainable']:,} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], args: argparse.Namespace, machine: str, path: Path) -> None:
    """Bars of time and held-memory ratios to the frozen layer, one group per (T, r)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {row["arm"] for row in rows if row["status"] == "ok"}
    arms = [a for a in args.arms if a != "frozen" and a in ran]
    missing = sorted({row["status"] for row in rows if row["status"] != "ok"})
    groups = [(r, t) for r in args.r for t in args.tokens]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        for ax, key in zip(axes, ("x_frozen", "held_x_frozen")):
            values = []
            for r, t in groups:
                row = next(x for x in rows if x["arm"] == arm and x["r"] == r and x["tokens"] == t)
                values.append(row.get(key, float("nan")))
            ax.bar([i + k * width for i in range(len(groups))], values, width, label=LABELS[arm])
    for ax, title in zip(axes, ("forward+backward time / frozen", "activations held for backward / frozen")):
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"T={t}\nr={r}" for r, t in groups])
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    note = f"\nfused Triton rows: {'; '.join(missing)}" if missing else ""
    fig.suptitle(f"m = {args.m}, n = {args.n}, {args.dtype}: {machine}{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--m", type=int, default=1024, help="out_features")
    parser.add_argument("--n", type=int, default=1024, help="in_features")
    parser.add_argument("--r", type=int, nargs="+", default=[8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (CPU; 1 on a shared box)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="CPU runs: process CPU time (default; robust to a shared, oversubscribed machine) or wall time. "
        "CUDA runs always use wall time after a synchronize.",
    )
    parser.add_argument("--e2e", action="store_true", help="also time one SmolLM2 training step")
    parser.add_argument("--e2e-r", type=int, default=32)
    parser.add_argument("--e2e-batch", type=int, default=2)
    parser.add_argument("--e2e-seq", type=int, default=128)
    parser.add_argument("--e2e-repeats", type=int, default=3)
    parser.add_argument(
        "--name", default=None, help="file stem under outputs/bench_layers/ (default: device)"
    )
    args = parser.parse_args()
    if "frozen" not in args.arms:
        args.arms = ["frozen", *args.arms]
    torch.set_num_threads(args.threads)
    args.fused_status = fused_status(args.device, getattr(torch, args.dtype))
    cuda = args.device.startswith("cuda")
    args.clock = "wall" if cuda else args.clock
    args.clock_fn = time.process_time if args.clock == "cpu" else time.perf_counter
    machine = machine_name(args.device)
    rows = bench(args)
    report = markdown(rows, args, machine)
    e2e_rows = e2e_bench(args) if args.e2e else []
    if e2e_rows:
        report += "\n\n" + e2e_markdown(e2e_rows, args, machine)
    print("\n" + report)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.device.split(":")[0]
    (OUT_DIR / f"{stem}.md").write_text(report + "\n")
    (OUT_DIR / f"{stem}.json").write_text(
        json.dumps({"machine": machine, "layers": rows, "e2e": e2e_rows}, indent=1)
    )
    plot(rows, args, machine, OUT_DIR / f"{stem}.png")
    print(f"\nwrote {OUT_DIR / stem}.md / .json / .png")


if __name__ == "__main__":
    main()
