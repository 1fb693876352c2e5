"""Continual-learning benchmark: 6 real tasks in sequence, 3 orders, one shared output space, no task id.

Model: all-MiniLM-L6-v2 (SmolLM2 is too slow for ~50 task trainings on a 2-core CPU). The lower
``--cached-layers`` encoder layers stay frozen and unadapted, so their outputs are computed once per text
and cached; every arm adapts the same linear layers of the top layers: query, key, value, the attention
output and the FFN's input projection (all with 384 inputs). Shared output space: an example's score for
each candidate answer text is the cosine between the mean-pooled embeddings of the input and of the
candidate (both through the adapted encoder), divided by a temperature, trained with cross-entropy over the
example's candidates (the label words for classification tasks, the example's options for multiple
choice). No task-specific head, no task id.

Arms: sequential LoRA (PEFT LoRA trained task after task), O-LoRA (``OrthoLoraConfig(mode="olora")``, its
penalty in the loss), subspace (``OrthoLoraConfig(mode="subspace")``), gradient and scaled (the modes of the
same names: ``A`` from the new task's loss gradient in the exact complement, or in SGP's scaled complement),
PEFT ``osf`` (re-applied on the merged weights for each task, ``merge_and_unload`` between tasks; preserved
rank grows per task) and multitask LoRA (all tasks' data at once: the upper reference, AA only).

Metrics, with ``R[t][i]`` the test accuracy on task ``i`` after training task ``t`` (T tasks):
AA = mean_i R[T-1][i]; BWT = mean_{i < T-1} (R[T-1][i] - R[i][i]) (Lopez-Paz & Ranzato, 2017); plasticity =
mean_i R[i][i]. ``--jobs N`` runs independent (arm, seed) runs and tuning runs in N forked processes.

    OMP_NUM_THREADS=1 python scripts/continual_benchmark.py --output-dir outputs/continual
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, OSFConfig, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from ortho_adapters import OrthoLoraConfig
from ortho_adapters.continual import end_task, olora_penalty, start_task
from ortho_adapters.continual.metrics import transfer_metrics
from ortho_adapters.data import load_minilm, load_rotten_tomatoes
from ortho_adapters.jobs.adamw_loop import train_adamw
from ortho_adapters.tasks import load_task as load_task_table

# every source of ortho_adapters.tasks that MiniLM learns above chance in one epoch, plus Rotten Tomatoes
# (logiqa and arithmetic stay at chance: see docs/continual.md, "Round two")
TASKS = ("rotten_tomatoes", "sarcasm", "corr2cause", "social_iqa", "event_categories", "quartz")
ORDERS = (
    (0, 1, 2, 3, 4, 5),
    (5, 4, 3, 2, 1, 0),
    (2, 5, 0, 3, 1, 4),
)
ORTHO_ARMS = ("olora", "subspace", "gradient", "scaled")  # OrthoLoraConfig modes
ARMS = ("seq_lora", "olora", "subspace", "gradient", "scaled", "osf", "multitask_lora")
# every linear layer of the adapted blocks whose input is the 384-dim hidden state (not the FFN's 1536->384
# output projection: its 1536 x 1536 eigendecompositions would dominate the subspace arm's CPU time)
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]


@dataclass
class Example:
    text: str
    candidates: list[str]
    answer: int


# ----------------------------------------------------------------------------------------------- data
def load_task(name: str, n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list[Example]]:
    """``{"train", "val", "test"}`` examples of one task: disjoint random draws (``val`` only for choosing
    settings, never reported as the result; the test and train draws do not depend on ``n_val``)."""
    if name == "rotten_tomatoes":
        ds = load_rotten_tomatoes(n_train=n_train + n_val, n_eval=n_test, seed=seed)
        words = ["negative", "positive"]
        train, test = (
            [Example(t, words, int(y)) for t, y in zip(ds[split]["text"], ds[split]["label"])]
            for split in ("train", "test")
        )
        return {"train": train[:n_train], "val": train[n_train:], "test": test}
    ds = load_task_table(name)
    if n_test + n_train + n_val > len(ds):
        raise ValueError(f"{name} has {len(ds)} rows, fewer than {n_test + n_train + n_val} requested")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    rows = ds.select(order[: n_test + n_train + n_val])
    examples = [
        Example(text.strip(), [c.replace("_", " ").strip().lower() for c in choices], int(answer))
        for text, choices, answer in zip(rows["input"], rows["choices"], rows["answer"])
    ]
    return {
        "train": examples[n_test : n_test + n_train],
        "val": examples[n_test + n_train :],
        "test": examples[:n_test],
    }


def run_layers(layers, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """BERT encoder layers with the additive padding mask BERT's eager attention uses."""
    additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        hidden = layer(hidden, additive)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


class FrozenLower:
    """Embeddings and the lower encoder layers of MiniLM, run once per text (cached)."""

    def __init__(self, bert: nn.Module, tokenizer, n_layers: int, max_length: int):
        self.bert, self.tok, self.n_layers, self.max_length = bert, tokenizer, n_layers, max_length
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> None:
        todo = sorted({t for t in texts if t not in self.cache})
        for i in tqdm(range(0, len(todo), batch_size), desc="lower layers (cached)", leave=False):
            chunk = todo[i : i + batch_size]
            enc = self.tok(
                chunk, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
            hidden = self.bert.embeddings(
                input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids")
            )
            hidden = run_layers(self.bert.encoder.layer[: self.n_layers], hidden, enc["attention_mask"])
            for j, text in enumerate(chunk):
                self.cache[text] = hidden[j, : int(enc["attention_mask"][j].sum())].clone()

    def batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded ``hidden_states`` (B, L, d) and ``attention_mask`` (B, L) for ``texts``."""
        seqs = [self.cache[t] for t in texts]
        length = max(s.shape[0] for s in seqs)
        hidden = torch.zeros(len(seqs), length, seqs[0].shape[1])
        mask = torch.zeros(len(seqs), length, dtype=torch.long)
        for j, s in enumerate(seqs):
            hidden[j, : s.shape[0]] = s
            mask[j, : s.shape[0]] = 1
        return {"hidden_states": hidden, "attention_mask": mask}


class TopEncoder(nn.Module):
    """Upper MiniLM layers on cached hidden states, mean-pooled ``forward(hidden_states, attention_mask)``."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layer = layers

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden_states = run_layers(self.layer, hidden_states, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


# ------------------------------------------------------------------------------------------ scoring
def scores(model: nn.Module, lower: FrozenLower, examples: list[Example], temperature: float) -> torch.Tensor:
    """``(B, max candidates)`` cosine / temperature scores, ``-inf`` where an example has fewer candidates."""
    cands = sorted({c for ex in examples for c in ex.candidates})
    index = {c: i for i, c in enumerate(cands)}
    e_x = F.normalize(model(**lower.batch([ex.text for ex in examples])), dim=-1)
    e_c = F.normalize(model(**lower.batch(cands)), dim=-1)
    sim = e_x @ e_c.t() / temperature
    width = max(len(ex.candidates) for ex in examples)
    out = torch.full((len(examples), width), float("-inf"))
    for j, ex in enumerate(examples):
        out[j, : len(ex.candidates)] = sim[j, [index[c] for c in ex.candidates]]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, lower: FrozenLower, examples: list[Example], args) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(examples), args.eval_batch_size):
        chunk = examples[i : i + args.eval_batch_size]
        pred = scores(model, lower, chunk, args.temperature).argmax(-1)
        correct += sum(int(p) == ex.answer for p, ex in zip(pred, chunk))
    return correct / len(examples)


def train(model: nn.Module, lower: FrozenLower, examples: list[Example], args, lr: float, seed: int,
          penalty=None, desc: str = "") -> None:  # fmt: skip
    """AdamW over ``examples`` for ``args.epochs``: cross-entropy over each example's candidates, plus
    ``penalty(model)`` (:func:`ortho_adapters.jobs.adamw_loop.train_adamw`)."""

    def chunk_loss(chunk: list[Example]) -> torch.Tensor:
        logits = scores(model, lower, chunk, args.temperature)
        return F.cross_entropy(logits, torch.tensor([ex.answer for ex in chunk]))

    train_adamw(model, examples, chunk_loss, lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                penalty=penalty, desc=desc, disable_progress=args.no_progress)  # fmt: skip


def stats_batches(lower: FrozenLower, examples: list[Example], n: int, batch_size: int) -> list[dict]:
    """Batches of a task's inputs and candidate texts (the layer inputs it produces) for the lifecycle."""
    chosen = examples[:n]
    texts = [ex.text for ex in chosen] + sorted({c for ex in chosen for c in ex.candidates})
    return [lower.batch(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]


# ---------------------------------------------------------------------------------------------- arms
def grad_batches(examples: list[Example], n: int, batch_size: int) -> list[list[Example]]:
    """Chunks of a task's first ``n`` training examples: the gradient pass's batches at ``start_task``."""
    chosen = examples[:n]
    return [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]


def task_loss(lower: FrozenLower, temperature: float):
    """``loss_fn(model, chunk)`` of the shared answer space: cross-entropy over each example's candidates."""

    def loss_fn(model: nn.Module, chunk: list[Example]) -> torch.Tensor:
        logits = scores(model, lower, chunk, temperature)
        return F.cross_entropy(logits, torch.tensor([ex.answer for ex in chunk]))

    return loss_fn


def run_sequence(arm: str, order: tuple[int, ...], top: TopEncoder, lower: FrozenLower, data, args,
                 seed: int, lr: float, split: str = "test",
                 info: dict | None = None) -> list[list[float]]:  # fmt: skip
    """Train ``arm`` on the tasks in ``order``; ``R[t][i]``: accuracy on ``split`` of task ``order[i]`` after
    step t. ``info`` (optional) receives ``trainable``: the trainable values of each task's training."""
    names = [TASKS[k] for k in order]
    torch.manual_seed(seed)  # PEFT LoRA's A init draws from the global RNG: every arm and order reproducible
    model: nn.Module = copy.deepcopy(top)
    if arm == "seq_lora":
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS))
    elif arm in ORTHO_ARMS:
        cfg = OrthoLoraConfig(
            mode=arm,
            r=args.r,
            alpha=args.alpha,
            target_modules=TARGETS,
            energy=args.energy_scaled if arm == "scaled" and args.energy_scaled else args.energy,
            l1=args.l1,
            sgp_scale=args.sgp_scale,
            room_share={"subspace": args.room_share_subspace, "scaled": args.room_share_scaled}.get(
                arm, args.room_share
            ),
            task_ranks=args.task_ranks_subspace if arm == "subspace" else None,
        )
        model = get_peft_model(model, cfg)
    R: list[list[float]] = []
    trainable: list[int] = []
    for t, name in enumerate(names):
        train_ex = data[name]["train"]
        penalty = None
        if arm == "osf":
            step = args.osf_rank_step if args.osf_rank_step is not None else 1.0 / len(names)
            rank = step * t  # preserved (frozen) share of each weight's spectrum grows per task
            model = get_peft_model(model, OSFConfig(target_modules=TARGETS, effective_rank=rank or 1))
        elif arm == "subspace":
            start_data = stats_batches(lower, train_ex, args.stats_examples, args.batch_size)
            start_task(model, name, start_data if args.subspace_a == "data" else None)
        elif arm in ("gradient", "scaled"):
            batches = grad_batches(train_ex, args.stats_examples, args.batch_size)
            start_task(model, name, batches, loss_fn=task_loss(lower, args.temperature))
        elif arm == "olora":
            start_task(model, name)
            penalty = olora_penalty
        trainable.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        train(model, lower, train_ex, args, lr, seed + t, penalty, desc=f"{arm} {t + 1}/{len(names)} {name}")
        if arm == "osf":
            model = model.merge_and_unload()
        elif arm in ("subspace", "gradient", "scaled"):
            ks = end_task(model, stats_batches(lower, train_ex, args.stats_examples, args.batch_size))
            print(
                f"    {arm} basis dims after {name}: min {min(ks.values())}, max {max(ks.values())}",
                flush=True,
            )
        elif arm == "olora":
            end_task(model)
        R.append([accuracy(model, lower, data[n][split], args) for n in names[: t + 1]])
        print(f"  {arm} order={order} after {name}: {[round(a, 3) for a in R[-1]]}", flush=True)
    if info is not None:
        info["trainable"] = trainable
    return R


def run_multitask(top: TopEncoder, lower: FrozenLower, data, args, seed: int, lr: float,
                  info: dict | None = None) -> list[float]:  # fmt: skip
    """Multitask LoRA (all tasks' training data at once) at sequential LoRA's learning rate."""
    torch.manual_seed(seed)
    model = get_peft_model(
        copy.deepcopy(top), LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS)
    )
    union = [ex for name in TASKS[: args.n_tasks] for ex in data[name]["train"]]
    if info is not None:
        info["trainable"] = [sum(p.numel() for p in model.parameters() if p.requires_grad)]
    train(model, lower, union, args, lr, seed, desc="multitask_lora")
    return [accuracy(model, lower, data[name]["test"], args) for name in TASKS[: args.n_tasks]]


# The prepared data of every seed, set before the worker processes fork (they read it, never pickle it).
_STATE: dict = {}


def _pool_map(fn, jobs: list, n_jobs: int):
    """``(job, fn(job))`` for every job, in forked worker processes when ``n_jobs > 1`` (as they finish)."""
    if n_jobs <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, fn(job)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(min(n_jobs, len(jobs)), maxtasksperchild=1) as pool:
        yield from zip(jobs, pool.imap(fn, jobs))


def _tune_job(job: tuple[str, float]) -> dict:
    arm, lr = job
    args = _STATE["args"]
    data, lower, top = _STATE["prepared"][args.seeds[0]]
    t0 = time.time()
    R = run_sequence(arm, args.orders[0], top, lower, data, args, args.seeds[0] + 7, lr, split="val")
    aa, bwt, plast = transfer_metrics(R)
    print(f"  tune {arm} lr={lr:g}: validation AA {aa:.3f} BWT {bwt:+.3f} plasticity {plast:.3f}", flush=True)
    return {"AA": aa, "BWT": bwt, "plasticity": plast, "R": R, "seconds": time.time() - t0}


def tune_lrs(lrs: dict[str, float], top: TopEncoder, lower: FrozenLower, data, args) -> dict:
    """Per sequential arm, the learning rate of its grid with the best validation AA on the first order.

    Updates ``lrs`` in place; returns ``{arm: {lr: validation AA}}`` (``args.tuning_detail`` gets BWT,
    plasticity and ``R`` of each run too). Test data is never used here.
    """
    grids = {arm: args.lr_grid_osf if arm == "osf" else args.lr_grid for arm in lrs}
    _STATE.setdefault("prepared", {})[args.seeds[0]] = (data, lower, top)
    _STATE["args"] = args
    jobs = [(arm, lr) for arm in args.arms if arm in lrs for lr in grids[arm]]
    found: dict = {arm: {} for arm, _ in jobs}
    args.tuning_detail = {arm: {} for arm, _ in jobs}
    for (arm, lr), res in _pool_map(_tune_job, jobs, args.jobs):
        found[arm][lr] = res["AA"]
        args.tuning_detail[arm][str(lr)] = res
    for arm in found:
        lrs[arm] = max(found[arm], key=found[arm].get)
    return found


# ------------------------------------------------------------------------------------------- reports
def write_table(results: dict, args, path: Path, wall: float) -> str:
    seeds = [str(s) for s in args.seeds]
    lines = [
        "| arm | " + " | ".join(f"seed {s} AA / BWT" for s in seeds) + " | mean AA | mean BWT |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for arm in args.arms:
        runs = [results["seeds"][s][arm] for s in seeds]
        if arm == "multitask_lora":
            cells = " | ".join(f"{r['AA']:.3f} / n/a" for r in runs)
            lines.append(f"| {arm} (upper reference) | {cells} | {results[arm]['mean_AA']:.3f} | n/a |")
            continue
        cells = " | ".join(f"{r['AA']:.3f} / {r['BWT']:+.3f}" for r in runs)  # each: mean over the orders
        lines.append(f"| {arm} | {cells} | {results[arm]['mean_AA']:.3f} | {results[arm]['mean_BWT']:+.3f} |")
    tasks = ", ".join(TASKS[: args.n_tasks])
    tuned = (
        f"each chosen from its grid by validation AA on order 1 of seed {seeds[0]} "
        f"({args.n_val} validation examples per task)"
        if "tuning" in results
        else "fixed"
    )
    orders = "; ".join(" -> ".join(str(k + 1) for k in o) for o in args.orders)
    note = (
        f"\nEach seed cell: mean over the {len(args.orders)} orders ({orders}); seeds draw the data, "
        f"initializations and batch order. Tasks (1..{args.n_tasks}): {tasks}. MiniLM-L6 (lower "
        f"{args.cached_layers} layers frozen and cached), {args.n_train} train / {args.n_test} test "
        "per task, "
        f"max length {args.max_length}, {args.epochs} epoch(s), batch {args.batch_size}, r={args.r}, "
        f"alpha={args.alpha}, lr {results['lr']} ({tuned}), subspace A from {args.subspace_a}, energy "
        f"{args.energy}, scaled-mode energy {args.energy_scaled or args.energy}, sgp_scale {args.sgp_scale}, "
        f"room_share {args.room_share} (gradient), {args.room_share_scaled} (scaled) and "
        f"{args.room_share_subspace} (subspace), "
        + (f"subspace ranks per task {args.task_ranks_subspace}, " if args.task_ranks_subspace else "")
        + f"l1 {args.l1}, {args.jobs} worker process(es). Wall time {wall / 60:.1f} min.\n"
    )
    summary = [
        "",
        f"Means over the {len(seeds) * len(args.orders)} (seed, order) runs; plasticity = mean R[i][i]; "
        "trainable values: the most any task trains at once; minutes: the arm's own run time summed over "
        "seeds (runs in parallel processes overlap).",
        "",
        "| arm | mean AA | mean BWT | plasticity | trainable values | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for arm in args.arms:
        r = results[arm]
        if arm == "multitask_lora":
            summary.append(
                f"| {arm} (upper reference) | {r['mean_AA']:.3f} | n/a | n/a | {r['trainable']:,} | "
                f"{r['seconds'] / 60:.1f} |"
            )
            continue
        summary.append(
            f"| {arm} | {r['mean_AA']:.3f} | {r['mean_BWT']:+.3f} | {r['plasticity']:.3f} | "
            f"{r['trainable']:,} | {r['seconds'] / 60:.1f} |"
        )
    seq = [a for a in args.arms if a != "multitask_lora"]
    T = len(args.orders[0])
    position = [
        "",
        "Plasticity by position in the order (mean R[i][i] over the runs):",
        "",
        "| arm | " + " | ".join(f"task {i + 1}" for i in range(T)) + " |",
        "|---|" + "---|" * T,
    ]
    for arm in seq:
        cells = " | ".join(f"{v:.3f}" for v in results[arm]["plasticity_by_position"])
        position.append(f"| {arm} | {cells} |")
    text = "\n".join(lines) + "\n" + note + "\n".join(summary) + "\n" + "\n".join(position) + "\n"
    path.write_text(text)
    return text


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in args.arms if a != "multitask_lora"]
    fig, axes = plt.subplots(len(args.orders), len(arms), figsize=(3.2 * len(arms), 2.6 * len(args.orders)),
                             sharey=True, squeeze=False)  # fmt: skip
    for row, order in enumerate(args.orders):
        for col, arm in enumerate(arms):
            ax = axes[row][col]
            R = results["seeds"][str(args.seeds[0])][arm]["orders"][row]["R"]
            for i, k in enumerate(order):
                xs = list(range(i + 1, len(order) + 1))
                ax.plot(
                    xs, [R[t][i] for t in range(i, len(order))], marker="o", color=f"C{k}", label=TASKS[k]
                )
            ax.set_title(f"{arm}, order {row + 1}, seed {args.seeds[0]}", fontsize=9)
            ax.set_xticks(range(1, len(order) + 1))
            if col == 0:
                ax.set_ylabel("test accuracy")
            if row == len(args.orders) - 1:
                ax.set_xlabel("after training task #")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)


def plot_positions(results: dict, args, path: Path) -> None:
    """Mean ``R[i][i]`` by position in the order, one line per sequential arm, with AA in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for arm in [a for a in args.arms if a != "multitask_lora"]:
        r = results[arm]
        xs = range(1, len(r["plasticity_by_position"]) + 1)
        ax.plot(xs, r["plasticity_by_position"], marker="o", label=f"{arm} (AA {r['mean_AA']:.3f})")
    ax.set_xticks(range(1, len(args.orders[0]) + 1))
    ax.set_xlabel("position of the task in the order")
    ax.set_ylabel("mean accuracy right after learning it")
    ax.set_title(f"plasticity by position, mean over {len(args.seeds) * len(args.orders)} runs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="outputs/continual")
    p.add_argument("--n-train", type=int, default=192)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-val", type=int, default=200, help="validation examples per task (for --tune)")
    p.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="choose each sequential arm's lr from its grid by validation AA on the first order "
        "(else --lr, --lr-olora, --lr-subspace, --lr-osf)",
    )
    p.add_argument("--lr-grid", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3, 2e-3])
    p.add_argument("--lr-grid-osf", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--cached-layers", type=int, default=4, help="lower MiniLM layers run once and cached")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-3, help="sequential / multitask LoRA and O-LoRA")
    p.add_argument("--lr-olora", type=float, default=None, help="O-LoRA (default: --lr)")
    p.add_argument("--lr-subspace", type=float, default=2e-3)
    p.add_argument("--lr-gradient", type=float, default=None, help="gradient mode (default: --lr-subspace)")
    p.add_argument("--lr-scaled", type=float, default=None, help="scaled mode (default: --lr-subspace)")
    p.add_argument("--lr-osf", type=float, default=1e-4)
    p.add_argument(
        "--osf-rank-step",
        type=float,
        default=None,
        help="preserved rank share added per task (default 1 / number of tasks)",
    )
    p.add_argument("--energy", type=float, nargs="+", default=[0.99])
    p.add_argument("--energy-scaled", type=float, nargs="+", default=None, help="scaled mode (else --energy)")
    p.add_argument("--sgp-scale", type=float, default=10.0, help="SGP's importance scale a (scaled mode)")
    p.add_argument("--room-share", type=float, default=1.0, help="room_share of the gradient arm")
    p.add_argument("--room-share-scaled", type=float, default=1.0, help="room_share of the scaled arm")
    p.add_argument("--room-share-subspace", type=float, default=1.0, help="room_share of the subspace arm")
    p.add_argument(
        "--task-ranks-subspace",
        type=int,
        nargs="+",
        default=None,
        help="rank of each task in the subspace arm (OrthoLoraConfig.task_ranks; default --r for every task)",
    )
    p.add_argument(
        "--lrs-from",
        nargs="+",
        default=None,
        help="results.json files of --tune-only runs (same data and validation split): take their chosen lrs "
        "and tuning tables instead of tuning again (a later file wins for an arm both tuned)",
    )
    p.add_argument(
        "--subspace-a",
        choices=["data", "random"],
        default="data",
        help="subspace A: top-r directions of the new task's inputs in the complement, or random there",
    )
    p.add_argument("--l1", type=float, default=0.5)
    p.add_argument(
        "--stats-examples", type=int, default=96, help="examples per task for the input statistics"
    )
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--n-orders", type=int, default=3)
    p.add_argument("--n-tasks", type=int, default=len(TASKS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="data draws and inits (tune: first)"
    )
    p.add_argument("--jobs", type=int, default=1, help="forked worker processes for independent runs")
    p.add_argument("--tune-only", action="store_true", help="stop after the validation tuning")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from OUTPUT_DIR/results.json")
    args = p.parse_args(argv)
    args.orders = [tuple(k for k in o if k < args.n_tasks) for o in ORDERS[: args.n_orders]]
    return args


def prepare(bert, tok, args, seed: int) -> tuple[dict, FrozenLower, TopEncoder]:
    """The tasks' splits drawn with ``seed``, their cached lower-layer outputs and the frozen top layers."""
    data = {n: load_task(n, args.n_train, args.n_val, args.n_test, seed) for n in TASKS[: args.n_tasks]}
    lower = FrozenLower(bert, tok, args.cached_layers, args.max_length)
    lower.encode(
        [t for d in data.values() for part in d.values() for ex in part for t in [ex.text, *ex.candidates]]
    )
    top = TopEncoder(copy.deepcopy(bert.encoder.layer[args.cached_layers :])).eval()
    for p in top.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # the split model equals the full encoder (mean-pooled)
        texts = [ex.text for ex in data[TASKS[0]]["test"][:4]]
        enc = tok(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
        full = bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        ref = (full * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(top(**lower.batch(texts)), ref, rtol=1e-4, atol=1e-4)
    return data, lower, top


def run_arm(arm: str, top: TopEncoder, lower: FrozenLower, data, args, seed: int, lrs: dict) -> dict:
    """One arm on one data draw: every order's ``R``, AA and BWT (multitask: its per-task accuracies)."""
    if arm == "multitask_lora":
        info: dict = {}
        accs = run_multitask(top, lower, data, args, seed, lrs["seq_lora"], info)
        return {"accuracy": accs, "AA": sum(accs) / len(accs), "trainable": info["trainable"]}
    per = []
    for k, order in enumerate(args.orders):
        info = {}
        R = run_sequence(arm, order, top, lower, data, args, seed + 100 * k, lrs[arm], info=info)
        aa, bwt, _ = transfer_metrics(R)
        per.append({"order": [TASKS[i] for i in order], "R": R, "AA": aa, "BWT": bwt, **info})
    return {
        "orders": per,
        "AA": sum(o["AA"] for o in per) / len(per),
        "BWT": sum(o["BWT"] for o in per) / len(per),
    }


def _arm_job(job: tuple[int, str]) -> dict:
    seed, arm = job
    data, lower, top = _STATE["prepared"][seed]
    t0 = time.time()
    out = run_arm(arm, top, lower, data, _STATE["args"], seed, _STATE["lrs"])
    out["seconds"] = time.time() - t0
    print(f"seed {seed}: {arm} done in {out['seconds']:.0f} s", flush=True)
    return out


def summarize(results: dict, args) -> None:
    """Means over every seed and order: AA, BWT, plasticity, trainable values per task, wall time, and the
    mean ``R[i][i]`` by position ``i`` in the order."""
    for arm in args.arms:
        runs = [results["seeds"][str(s)][arm] for s in args.seeds]
        seconds = sum(r["seconds"] for r in runs)
        if arm == "multitask_lora":
            results[arm] = {
                "mean_AA": sum(r["AA"] for r in runs) / len(runs),
                "trainable": max(v for r in runs for v in r["trainable"]),
                "seconds": seconds,
            }
            continue
        cells = [o for r in runs for o in r["orders"]]
        T = len(cells[0]["R"])
        position = [sum(o["R"][i][i] for o in cells) / len(cells) for i in range(T)]
        results[arm] = {
            "mean_AA": sum(o["AA"] for o in cells) / len(cells),
            "mean_BWT": sum(o["BWT"] for o in cells) / len(cells),
            "plasticity": sum(position) / T,
            "plasticity_by_position": position,
            "trainable": max(v for o in cells for v in o["trainable"]),
            "seconds": seconds,
            "runs": len(cells),
        }


def main(argv=None) -> dict:
    """Run the benchmark; the caller's torch thread count is restored afterwards (``--jobs > 1`` sets one
    thread, which a caller such as a test process must not inherit)."""
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        results = json.loads((out / "results.json").read_text())
        plot(results, args, out / "per_task_accuracy.png")
        return results
    start = time.time()
    if args.jobs > 1:  # one thread per process: a forked worker must not inherit a busy OpenMP pool
        torch.set_num_threads(1)
    bert, tok = load_minilm()
    bert.eval()
    results: dict = {"args": {k: v for k, v in vars(args).items()}, "seeds": {}}
    lrs = {
        "seq_lora": args.lr,
        "olora": args.lr_olora or args.lr,
        "subspace": args.lr_subspace,
        "gradient": args.lr_gradient or args.lr_subspace,
        "scaled": args.lr_scaled or args.lr_subspace,
        "osf": args.lr_osf,
    }
    prepared = _STATE.setdefault("prepared", {})
    prepared.clear()
    _STATE["args"] = args
    seeds = args.seeds[:1] if args.tune_only else args.seeds
    for seed in seeds:
        data, lower, top = prepared[seed] = prepare(bert, tok, args, seed)
        zero_shot = {n: accuracy(top, lower, data[n]["test"], args) for n in data}
        results["seeds"][str(seed)] = {"zero_shot": zero_shot}
        print(f"seed {seed}: data ready at {time.time() - start:.0f} s; zero-shot {zero_shot}", flush=True)
    if args.lrs_from:  # chosen earlier by a --tune-only run on the same validation split
        results["tuning"], results["tuning_detail"] = {}, {}
        for path in args.lrs_from:
            earlier = json.loads(Path(path).read_text())
            for arm in [a for a in args.arms if a in lrs and a in earlier.get("tuning", {})]:
                lrs[arm] = earlier["lr"][arm]
                results["tuning"][arm] = earlier["tuning"][arm]
                results["tuning_detail"][arm] = earlier.get("tuning_detail", {}).get(arm)
        results["lrs_from"] = args.lrs_from
        print(f"chosen on validation (from {args.lrs_from}): {lrs}", flush=True)
    elif args.tune:  # validation split of the first seed's draw only
        data, lower, top = prepared[args.seeds[0]]
        results["tuning"] = tune_lrs(lrs, top, lower, data, args)
        results["tuning_detail"] = args.tuning_detail
        results["tuning_seconds"] = time.time() - start
        print(f"chosen on validation: {lrs}", flush=True)
    results["lr"] = dict(lrs)
    results["args"] = {k: v for k, v in vars(args).items() if k != "tuning_detail"}
    if args.tune_only:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        return results
    _STATE["lrs"] = lrs
    jobs = [(seed, arm) for seed in args.seeds for arm in args.arms]
    for (seed, arm), res in _pool_map(_arm_job, jobs, args.jobs):
        results["seeds"][str(seed)][arm] = res
        (out / "results.json").write_text(json.dumps(results, indent=1))
    summarize(results, args)
    wall = time.time() - start
    results["wall_seconds"] = wall
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(write_table(results, args, out / "results.md", wall))
    if any(a != "multitask_lora" for a in args.arms):
        plot(results, args, out / "per_task_accuracy.png")
        plot_positions(results, args, out / "plasticity_by_position.png")
    return results


if __name__ == "__main__":
    main()
