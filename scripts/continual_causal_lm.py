"""Continual learning in O-LoRA's own regime: SmolLM2-135M-Instruct answers in text, 4 tasks in sequence.

The causal-LM counterpart of ``scripts/continual_benchmark.py`` (MiniLM, shared cosine answer space). Here
every task is a chat prompt (:mod:`ortho_adapters.jobs.lm_tasks`) and the model is trained with the
causal-LM loss on the answer text only (prompt tokens labelled -100); a test item counts as correct when
its answer text has the highest summed log-likelihood among the item's candidate answers
(:func:`ortho_adapters.jobs.scoring.score_choices`, the end-of-turn token included). No task id, no head.

Arms: ``seq_lora`` (PEFT LoRA trained task after task), ``olora`` (``OrthoLoraConfig(mode="olora")`` with
:func:`olora_penalty` in the loss), ``subspace`` / ``gradient`` / ``scaled`` (the structural modes, with
``start_task`` / ``end_task``), ``osf`` (PEFT ``OSFConfig`` re-applied on the merged weights for each task,
``merge_and_unload`` between tasks) and ``multitask_lora`` (all tasks' training data at once: the upper
reference, AA only). One order, one seed by default.

Metrics, with ``R[t][i]`` the test accuracy on task ``i`` after training task ``t`` (T tasks):
AA = mean_i R[T-1][i]; BWT = mean_{i < T-1} (R[T-1][i] - R[i][i]); plasticity = mean_i R[i][i].

    OMP_NUM_THREADS=2 python scripts/continual_causal_lm.py --output-dir outputs/continual_causal_lm
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, OSFConfig, get_peft_model
from torch import nn

from ortho_adapters import OrthoLoraConfig
from ortho_adapters.continual import end_task, olora_penalty, start_task
from ortho_adapters.continual.metrics import transfer_metrics
from ortho_adapters.jobs.adamw_loop import train_adamw
from ortho_adapters.jobs.causal_lm import load_model
from ortho_adapters.jobs.lm_tasks import LMExample, load_examples
from ortho_adapters.jobs.scoring import LeftPadCollator, choice_accuracy, score_choices, training_features

TASKS = ("rotten_tomatoes", "sarcasm", "event_categories", "corr2cause")
ORTHO_ARMS = ("olora", "subspace", "gradient", "scaled")
ARMS = ("seq_lora", "olora", "subspace", "gradient", "scaled", "osf", "multitask_lora")
DEFAULT_ARMS = ("seq_lora", "olora", "subspace", "osf", "multitask_lora")


# ----------------------------------------------------------------------------------------------- data
def batches_of(tokenizer, examples: list[LMExample], batch_size: int, labels: bool = True) -> list[dict]:
    """Left-padded training batches (answer-only labels) of ``examples`` in the given order. Without
    ``labels``: just ``input_ids`` / ``attention_mask`` / ``position_ids`` (the lifecycle's data)."""
    collator = LeftPadCollator(tokenizer.pad_token_id)
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collator([training_features(tokenizer, ex) for ex in examples[i : i + batch_size]])
        if not labels:
            batch = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
            batch["logits_to_keep"] = 1  # the lifecycle needs the layers' inputs, not the 49k-wide head
        out.append(batch)
    return out


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Causal-LM loss of a batch on its answer tokens (the gradient modes' ``loss_fn``)."""
    return model(**batch).loss


# ------------------------------------------------------------------------------------------ training
def train(model: nn.Module, tokenizer, examples: list[LMExample], args, lr: float, seed: int,
          penalty=None, desc: str = "") -> list[float]:  # fmt: skip
    """AdamW over ``examples`` for ``args.epochs`` on the answer tokens' causal-LM loss (plus ``penalty``);
    returns the step losses (:func:`ortho_adapters.jobs.adamw_loop.train_adamw`)."""

    def chunk_loss(chunk: list[LMExample]) -> torch.Tensor:
        return lm_loss(model, batches_of(tokenizer, chunk, len(chunk))[0])

    return train_adamw(model, examples, chunk_loss, lr=lr, epochs=args.epochs, batch_size=args.batch_size,
                       seed=seed, penalty=penalty, desc=desc, disable_progress=args.no_progress)  # fmt: skip


def accuracy(model: nn.Module, tokenizer, examples: list[LMExample], args) -> float:
    return choice_accuracy(score_choices(model, tokenizer, examples, args.eval_batch_size), examples)


def trainable_values(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- arms
def run_sequence(arm: str, base: nn.Module, tokenizer, data: dict, args, lr: float) -> dict:
    """Train ``arm`` on ``args.tasks`` in order; ``R[t][i]``: test accuracy on task ``i`` after task ``t``."""
    names = list(args.tasks)
    torch.manual_seed(args.seed)
    model: nn.Module = copy.deepcopy(base)
    if arm == "seq_lora":
        cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=list(args.targets), lora_dropout=0.0)
        model = get_peft_model(model, cfg)
    elif arm in ORTHO_ARMS:
        cfg = OrthoLoraConfig(
            mode=arm,
            r=args.r,
            alpha=args.alpha,
            target_modules=list(args.targets),
            energy=args.energy,
            l1=args.l1,
            init_seed=args.seed,
        )
        model = get_peft_model(model, cfg)
    R: list[list[float]] = []
    trainable: list[int] = []
    losses: list[list[float]] = []
    extra: list = []
    for t, name in enumerate(names):
        train_ex = data[name]["train"]
        stats = (  # the lifecycle's batches: only the structural arms read inputs at start / end
            batches_of(tokenizer, train_ex[: args.stats_examples], args.batch_size, labels=False)
            if arm in ("subspace", "gradient", "scaled")
            else None
        )
        penalty = None
        if arm == "osf":
            rank = t / len(names)  # preserved (frozen) share of each weight's spectrum grows per task
            model = get_peft_model(
                model, OSFConfig(target_modules=list(args.targets), effective_rank=rank or 1)
            )
        elif arm == "subspace":  # A: top input directions in the complement, or random ones there
            start_task(model, name, stats if args.subspace_a == "data" else None)
        elif arm in ("gradient", "scaled"):
            grad = batches_of(tokenizer, train_ex[: args.stats_examples], args.batch_size)
            start_task(model, name, grad, loss_fn=lm_loss)
        elif arm == "olora":
            start_task(model, name)
            penalty = olora_penalty
        trainable.append(trainable_values(model))
        t0 = time.time()
        losses.append(
            train(
                model,
                tokenizer,
                train_ex,
                args,
                lr,
                args.seed + t,
                penalty,
                f"{arm} {t + 1}/{len(names)} {name}",
            )
        )
        train_s = time.time() - t0
        if arm == "osf":
            model = model.merge_and_unload()
        elif arm in ("subspace", "gradient", "scaled"):
            ks = end_task(model, stats)
            extra.append({"task": name, "basis_min": min(ks.values()), "basis_max": max(ks.values())})
            print(
                f"    {arm} basis dims after {name}: min {min(ks.values())}, max {max(ks.values())}",
                flush=True,
            )
        elif arm == "olora":
            end_task(model)
        t0 = time.time()
        R.append([accuracy(model, tokenizer, data[n]["test"], args) for n in names[: t + 1]])
        print(
            f"  {arm} after {name} (train {train_s:.0f} s, loss {losses[-1][0]:.3f}->{losses[-1][-1]:.3f}, "
            f"eval {time.time() - t0:.0f} s): {[round(a, 3) for a in R[-1]]}",
            flush=True,
        )
    aa, bwt, plasticity = transfer_metrics(R)
    return {"R": R, "AA": aa, "BWT": bwt, "plasticity": plasticity, "trainable": trainable,
            "losses": losses, "basis": extra}  # fmt: skip


def run_multitask(base: nn.Module, tokenizer, data: dict, args, lr: float) -> dict:
    """Multitask LoRA: every task's training data shuffled together, one run, seq_lora's lr."""
    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=list(args.targets), lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), cfg)
    union = [ex for name in args.tasks for ex in data[name]["train"]]
    trainable = trainable_values(model)
    losses = train(model, tokenizer, union, args, lr, args.seed, desc="multitask_lora")
    accs = [accuracy(model, tokenizer, data[n]["test"], args) for n in args.tasks]
    print(f"  multitask_lora: {[round(a, 3) for a in accs]}", flush=True)
    return {"accuracy": accs, "AA": sum(accs) / len(accs), "trainable": [trainable], "losses": [losses]}


# ---------------------------------------------------------------------------------------------- report
def write_report(results: dict, args, path: Path) -> str:
    names = list(args.tasks)
    lines = [
        "# Continual learning with SmolLM2-135M-Instruct answering in text",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Tasks in order: {' -> '.join(names)}; {args.n_train} train / {args.n_test} test examples per task "
        f"(seed {args.seed}), max length {args.max_length} tokens, batch {args.batch_size}, {args.epochs} "
        f"epoch(s), AdamW at a constant lr; adapters on {', '.join(args.targets)}, r={args.r}, "
        f"alpha={args.alpha:g}, subspace A from {getattr(args, 'subspace_a', 'data')}, energy {args.energy}. "
        "Training: causal-LM loss on the answer tokens only. Test: the candidate "
        "answer text with the highest summed log-likelihood (end-of-turn token included) is the prediction.",
        "",
        "Zero-shot (base model) test accuracy: "
        + ", ".join(f"{n} {results['zero_shot'][n]:.3f}" for n in names)
        + "; chance: "
        + ", ".join(f"{n} {results['chance'][n]:.3f}" for n in names)
        + ".",
        "",
        "AA = mean_i R[T-1][i]; BWT = mean_{i<T-1} (R[T-1][i] - R[i][i]); plasticity = mean_i R[i][i]; "
        "trainable values: the most any task trains at once; seconds: the arm's wall time (training, "
        "lifecycle and evaluation after every task).",
        "",
        "| arm | lr | AA | BWT | plasticity | trainable values | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in args.arms:
        if arm not in results["arms"]:
            continue
        r = results["arms"][arm]
        if arm == "multitask_lora":
            lines.append(
                f"| {arm} (upper reference) | {r['lr']:g} | {r['AA']:.3f} | n/a | n/a | "
                f"{max(r['trainable']):,} | {r['seconds']:.0f} |"
            )
        else:
            lines.append(
                f"| {arm} | {r['lr']:g} | {r['AA']:.3f} | {r['BWT']:+.3f} | {r['plasticity']:.3f} | "
                f"{max(r['trainable']):,} | {r['seconds']:.0f} |"
            )
    lines += ["", "R matrices (row t: accuracy on the tasks seen so far after training task t):", ""]
    for arm in args.arms:
        if arm not in results["arms"]:
            continue
        r = results["arms"][arm]
        lines += [f"**{arm}**", "", "| after | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        if arm == "multitask_lora":
            lines.append("| all at once | " + " | ".join(f"{a:.2f}" for a in r["accuracy"]) + " |")
        else:
            for t, row in enumerate(r["R"]):
                cells = [f"{a:.2f}" for a in row] + [""] * (len(names) - len(row))
                lines.append(f"| {names[t]} | " + " | ".join(cells) + " |")
        lines.append("")
    wall = results.get("wall_seconds")
    if wall is not None:
        lines.append(f"Total wall time: {wall:.0f} s ({wall / 60:.1f} min), model loading and data included.")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(results: dict, args, path: Path) -> None:
    """One panel per sequential arm: each task's test accuracy after every training step from its own on,
    its zero-shot accuracy as a dashed line, and the arm's AA / BWT in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(args.tasks)
    arms = [a for a in args.arms if a != "multitask_lora" and a in results["arms"]]
    cols = min(len(arms), 4)
    rows = math.ceil(len(arms) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(3.3 * cols, 6.4), 2.8 * rows + 0.6), sharey=True, squeeze=False
    )
    for ax in axes.flat[len(arms) :]:
        ax.axis("off")
    for ax, arm in zip(axes.flat, arms):
        r = results["arms"][arm]
        for i, name in enumerate(names):
            xs = list(range(i + 1, len(names) + 1))
            ax.plot(xs, [r["R"][t][i] for t in range(i, len(names))], marker="o", color=f"C{i}", label=name)
            zero = results["zero_shot"].get(name)
            if zero is not None and zero == zero:  # not NaN
                ax.axhline(zero, color=f"C{i}", linestyle=":", linewidth=0.8)
        ax.set_title(f"{arm}: AA {r['AA']:.3f}, BWT {r['BWT']:+.3f}", fontsize=9)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xlabel("after training task #")
    for row in axes:
        row[0].set_ylabel("test accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct answering in text (dotted: zero-shot)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if len(labels) > 4 else 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="outputs/continual_causal_lm")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS)
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-3, help="seq_lora, olora and multitask LoRA")
    p.add_argument("--lr-subspace", type=float, default=None, help="structural modes (default: --lr)")
    p.add_argument("--lr-osf", type=float, default=1e-4)
    p.add_argument("--energy", type=float, default=0.99)
    p.add_argument("--l1", type=float, default=0.5)
    p.add_argument(
        "--subspace-a",
        choices=("data", "random"),
        default="data",
        help="subspace arm's A: the task's top input directions in the complement (data) or random ones",
    )
    p.add_argument("--stats-examples", type=int, default=64, help="examples per task for the lifecycle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-zero-shot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--plot-only", action="store_true", help="redraw results.md and accuracy.png from results.json"
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir)
    if args.plot_only:
        results = json.loads((out / "results.json").read_text())
        args = argparse.Namespace(**{**results["args"], "plot_only": True})
        print(write_report(results, args, out / "results.md"), flush=True)
        plot(results, args, out / "accuracy.png")
        return results
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:  # the caller's thread count comes back (a test calling main() must not change later tests)
        return run(args, out)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, out: Path) -> dict:
    """The whole benchmark for parsed ``args``: data, zero-shot, every arm, report and plot under ``out``."""
    start = time.time()
    argv = args.argv
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model()
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    data = {}
    for name in args.tasks:
        train_ex, test_ex = load_examples(
            tokenizer, name, args.n_train, args.n_test, args.max_length, args.seed
        )
        data[name] = {"train": train_ex, "test": test_ex}
    chance = {n: sum(1 / len(ex.choices) for ex in d["test"]) / len(d["test"]) for n, d in data.items()}
    cmd = f"OMP_NUM_THREADS={args.threads} python scripts/continual_causal_lm.py " + " ".join(
        shlex.quote(a) for a in argv
    )
    results: dict = {"command": cmd.strip(), "args": vars(args), "chance": chance, "arms": {}}
    print(f"data ready at {time.time() - start:.0f} s: " + ", ".join(
        f"{n} {len(d['train'])}/{len(d['test'])}" for n, d in data.items()), flush=True)  # fmt: skip
    if not args.no_zero_shot:
        t0 = time.time()
        results["zero_shot"] = {n: accuracy(base, tokenizer, data[n]["test"], args) for n in args.tasks}
        results["zero_shot_seconds"] = time.time() - t0
        print(f"zero-shot {results['zero_shot']} ({time.time() - t0:.0f} s)", flush=True)
    else:
        results["zero_shot"] = {n: float("nan") for n in args.tasks}
    lrs = {
        "seq_lora": args.lr,
        "olora": args.lr,
        "subspace": args.lr_subspace or args.lr,
        "gradient": args.lr_subspace or args.lr,
        "scaled": args.lr_subspace or args.lr,
        "osf": args.lr_osf,
        "multitask_lora": args.lr,
    }
    for arm in args.arms:
        t0 = time.time()
        print(f"=== {arm} (lr {lrs[arm]:g}) at {time.strftime('%H:%M:%S')}", flush=True)
        if arm == "multitask_lora":
            res = run_multitask(base, tokenizer, data, args, lrs[arm])
        else:
            res = run_sequence(arm, base, tokenizer, data, args, lrs[arm])
        res["lr"] = lrs[arm]
        res["seconds"] = time.time() - t0
        results["arms"][arm] = res
        if arm != "multitask_lora":
            print(f"  {arm}: AA {res['AA']:.3f} BWT {res['BWT']:+.3f} plasticity {res['plasticity']:.3f} "
                  f"trainable {max(res['trainable']):,} in {res['seconds']:.0f} s", flush=True)  # fmt: skip
            for t, row in enumerate(res["R"]):
                print(f"    R[{t}] = {[round(a, 2) for a in row]}", flush=True)
        results["wall_seconds_so_far"] = time.time() - start
        (out / "results.json").write_text(json.dumps(results, indent=1))
        write_report(results, args, out / "results.md")
    results["wall_seconds"] = time.time() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(write_report(results, args, out / "results.md"), flush=True)
    plot(results, args, out / "accuracy.png")
    return results


if __name__ == "__main__":
    main()
