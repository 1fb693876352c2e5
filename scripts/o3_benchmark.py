"""O3 unlearning benchmark: SmolLM2-135M fine-tuned on multiple-choice tasks (:mod:`ortho_adapters.tasks`),
then two sequential unlearning requests (each forgets one task); O3 (gate on / off) vs gradient-ascent
and random-label LoRAs.

1. "before": SmolLM2-135M-Instruct + a LoRA (r 16, all 7 projections) fine-tuned on the train items of the
   forget and kept tasks, merged into the weights.
2. Requests 1 and 2 forget ``--forget`` tasks one after another, using only their train items (no retained
   data). O3: :func:`ortho_adapters.o3.unlearn` (random wrong letter, orthogonality penalty, MiniLM detector,
   calibrated gate). Baselines: one LoRA trained sequentially on the same requests with gradient ascent
   (``-CE`` of the true letter) or with random wrong letters (O3's targets, no penalty, no gate).
3. Accuracy (letter with the highest logit among the item's options) on each forgotten and kept task's train
   items (memorized by the fine-tune) and held-out items, and on a utility task never fine-tuned on; the
   detector's AUROC of forgotten (held-out items) vs kept (held-out) + utility items. O3's gate ramp is
   reported at the default and at the ramp chosen on separate validation items (``--n-val`` per task).

Prompt: ``{input}\\nOptions:\\nA. ..\\nB. ..\\nAnswer:`` and target `` A``; options are shuffled (seeded) and
capped at ``--max-options`` (the answer always kept).

    OMP_NUM_THREADS=1 python scripts/o3_benchmark.py --out outputs/o3/run_n32
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ortho_adapters.o3.config import O3Config

LETTERS = "ABCDEFGH"


@dataclass
class BenchArgs:
    forget: tuple[str, ...] = ("arithmetic", "sarcasm")
    keep: tuple[str, ...] = ("social_iqa", "quartz")
    utility: str = "corr2cause"
    n_train: int = 32
    n_eval: int = 32
    n_val: int = 16  # per task, for choosing the gate ramp only (never reported as a result)
    max_options: int = 4
    max_length: int = 128
    finetune_epochs: int = 6
    finetune_lr: float = 2e-3
    unlearn_epochs: int = 3
    unlearn_lr: float = 3e-3
    ga_lr: float = 3e-4
    detector_epochs: int = 3
    gate_full_z: float = O3Config.gate_full_z  # the package's default ramp, not a copy of it
    gate_zero_z: float = O3Config.gate_zero_z
    ramp_grid: tuple[tuple[float, float], ...] = (
        (1.0, 2.0), (1.0, 4.0), (2.0, 3.0), (2.0, 5.0), (3.0, 4.0), (3.0, 6.0), (3.0, 12.0),
    )  # fmt: skip
    batch_size: int = 8
    eval_batch_size: int = 16
    seed: int = 0
    out: str = "outputs/o3/run"
    tiny: bool = False  # a random 2-layer Llama and a random tiny BERT detector (tests)
    tiny_detector: Optional[str] = None
    log: list[str] = field(default_factory=list)


def say(args: BenchArgs, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    args.log.append(line)
    print(line, flush=True)


# ------------------------------------------------------------------------------------------------ data
def mc_rows(task: str, n: int, offset: int, args: BenchArgs) -> list[dict]:
    """``n`` items of ``task`` from ``offset`` in a seeded order, as letter-choice rows."""
    from ortho_adapters.tasks import load_task

    ds = load_task(task)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(ds))[offset : offset + n]
    if len(order) < n:
        raise ValueError(f"{task} has {len(ds)} items, fewer than {offset + n}")
    rows = []
    for i in order:
        item = ds[int(i)]
        choices, answer = list(item["choices"]), int(item["answer"])
        item_rng = np.random.default_rng([args.seed, int(i)])
        others = [j for j in range(len(choices)) if j != answer]
        keep = [answer] + list(
            item_rng.choice(others, size=min(len(others), args.max_options - 1), replace=False)
        )
        item_rng.shuffle(keep)
        options = [choices[j] for j in keep]
        text = " ".join(item["input"].split())
        lines = [f"{LETTERS[k]}. {opt}" for k, opt in enumerate(options)]
        prompt = f"{text}\nOptions:\n" + "\n".join(lines) + "\nAnswer:"
        rows.append(
            {
                "prompt": prompt,
                "choices": [f" {LETTERS[k]}" for k in range(len(options))],
                "answer": keep.index(answer),
                "task": task,
            }
        )
    return rows


def truncate_prompt(tokenizer: Any, prompt: str, budget: int) -> str:
    """Keep the prompt's last ``budget`` tokens (the options and "Answer:" survive)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt if len(ids) <= budget else tokenizer.decode(ids[-budget:])


# ------------------------------------------------------------------------------------------------ model
def load_lm(args: BenchArgs):
    from ortho_adapters import data

    tokenizer = data.load_smollm2_tokenizer()
    tokenizer.padding_side = "left"
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        return LlamaForCausalLM(cfg).eval(), tokenizer
    model, _ = data.load_smollm2()
    return model.eval(), tokenizer


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[dict], args: BenchArgs, context=None) -> float:
    """Fraction of rows whose answer letter has the highest next-token logit among its options.

    ``context(prompts)`` returns a context manager entered around each batch (the O3 gate's inputs)."""
    from contextlib import nullcontext

    letter_ids = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in LETTERS]
    correct = 0
    model.eval()
    for start in range(0, len(rows), args.eval_batch_size):
        batch = rows[start : start + args.eval_batch_size]
        prompts = [r["prompt"] for r in batch]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        with context(prompts) if context else nullcontext():
            logits = model(**enc).logits[:, -1]
        for row, lg in zip(batch, logits):
            k = len(row["choices"])
            correct += int(int(lg[letter_ids[:k]].argmax()) == row["answer"])
    return correct / len(rows)


def encode(tokenizer, rows: list[dict], targets: list[str], args: BenchArgs) -> list[dict]:
    from ortho_adapters.o3.unlearn import encode_rows

    return encode_rows(tokenizer, [r["prompt"] for r in rows], targets, args.max_length)


def train_lora(
    model, rows_enc: list[dict], pad_id: int, epochs: int, lr: float, args: BenchArgs, sign: float = 1.0
):
    """A plain AdamW loop on ``sign * CE`` (sign -1: gradient ascent), no orthogonality penalty."""
    from ortho_adapters.o3.unlearn import train_loop

    return train_loop(model, rows_enc, pad_id, 0.0, epochs, lr, args.batch_size, args.seed, sign=sign)


def lora_config(r: int, alpha: float):
    from peft import LoraConfig

    from ortho_adapters.o3.config import LLAMA_PROJECTIONS

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LLAMA_PROJECTIONS), lora_dropout=0.0)


# ------------------------------------------------------------------------------------------------ run
def evaluate_all(
    model, tokenizer, sets: dict[str, list[dict]], args: BenchArgs, context=None
) -> dict[str, float]:
    return {name: accuracy(model, tokenizer, rows, args, context) for name, rows in sets.items()}


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney), the ROC area."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def choose_ramp(o3, val: dict[str, list[dict]], val_utility: list[dict], args: BenchArgs) -> dict:
    """Set and return the ``(full_z, zero_z)`` of ``args.ramp_grid`` with the largest ``mean w(forgotten
    tasks' validation items) - mean w(kept tasks' and utility validation items)`` (first on ties). Nothing is
    refitted: only the ramp over the calibrated scores moves (:meth:`O3Model.set_gate_ramp`)."""
    forget = [r["prompt"] for t in args.forget for r in val[t]]
    kept = [r["prompt"] for t in args.keep for r in val[t]] + [r["prompt"] for r in val_utility]
    grid, margin = {}, {}
    for full_z, zero_z in args.ramp_grid:
        o3.set_gate_ramp(full_z, zero_z)
        w_f, w_k = float(o3.gate_weights(forget).mean()), float(o3.gate_weights(kept).mean())
        grid[f"{full_z:g}/{zero_z:g}"] = {"w_forget_val": w_f, "w_kept_val": w_k}
        margin[(full_z, zero_z)] = w_f - w_k
        say(args, f"ramp {full_z:g}/{zero_z:g}: validation mean w forgotten {w_f:.3f}, kept {w_k:.3f}")
    best = max(args.ramp_grid, key=margin.__getitem__)
    o3.set_gate_ramp(*best)
    return {"chosen": list(best), "grid": grid}


def run(args: BenchArgs) -> dict:
    from peft import get_peft_model

    import ortho_adapters  # noqa: F401
    from ortho_adapters.o3 import O3Config, unlearn
    from ortho_adapters.o3.unlearn import replaced_targets

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = load_lm(args)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    budget = args.max_length - 4

    def prep(rows):
        return [{**r, "prompt": truncate_prompt(tok, r["prompt"], budget)} for r in rows]

    train = {t: prep(mc_rows(t, args.n_train, 0, args)) for t in args.forget + args.keep}
    held = {t: prep(mc_rows(t, args.n_eval, args.n_train, args)) for t in args.forget + args.keep}
    utility = prep(mc_rows(args.utility, args.n_eval, 0, args))
    # validation items (after the train and held-out ones): only for choosing the gate ramp
    val = {t: prep(mc_rows(t, args.n_val, args.n_train + args.n_eval, args)) for t in args.forget + args.keep}
    val_utility = prep(mc_rows(args.utility, args.n_val, args.n_eval, args))
    sets: dict[str, list[dict]] = {}
    for t in args.forget:
        sets[f"{t}/train"] = train[t]
        sets[f"{t}/held-out"] = held[t]
    for t in args.keep:  # kept tasks' train items: memorized by the fine-tune, so damage to them shows
        sets[f"{t}/train"] = train[t]
        sets[f"{t}/held-out"] = held[t]
    sets[f"{args.utility}/utility"] = utility
    chance = {name: float(np.mean([1 / len(r["choices"]) for r in rows])) for name, rows in sets.items()}
    say(args, f"data ready: {', '.join(f'{k}={len(v)}' for k, v in sets.items())}")

    # 1. fine-tune (LoRA merged into the weights) = the model before unlearning
    ft_rows = [r for t in args.forget + args.keep for r in train[t]]
    ft = get_peft_model(model, lora_config(16, 32))
    enc = encode(tok, ft_rows, [r["choices"][r["answer"]] for r in ft_rows], args)
    losses = train_lora(ft, enc, pad_id, args.finetune_epochs, args.finetune_lr, args)
    before_model = ft.merge_and_unload().eval()
    say(args, f"fine-tuned on {len(ft_rows)} items: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
    results: dict[str, dict[str, float]] = {"before unlearning": evaluate_all(before_model, tok, sets, args)}
    say(args, f"before: {results['before unlearning']}")

    requests = [(f"forget_{t}", train[t]) for t in args.forget]

    # 2a. O3
    o3_cfg = O3Config(
        r=8,
        alpha=16,
        detector_model=args.tiny_detector,
        detector_max_length=128,
        gate_full_z=args.gate_full_z,
        gate_zero_z=args.gate_zero_z,
    )
    o3 = get_peft_model(copy.deepcopy(before_model), o3_cfg)
    info = {}
    for name, rows in requests:
        t1 = time.time()
        info[name] = unlearn(
            o3,
            rows,
            name,
            tokenizer=tok,
            epochs=args.unlearn_epochs,
            lr=args.unlearn_lr,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            detector_epochs=args.detector_epochs,
        )
        say(
            args,
            f"O3 {name}: {time.time() - t1:.0f}s, loss {info[name]['lm_losses'][0]:.3f} -> "
            f"{info[name]['lm_losses'][-1]:.3f}, penalty {info[name]['penalty']:.4g}, "
            f"held-out w {np.mean(info[name]['heldout_weights']):.2f}",
        )
    gated = lambda p: o3.gate_inputs(texts=p)  # noqa: E731
    label = f"O3, gate on (default ramp {args.gate_full_z:g}/{args.gate_zero_z:g})"
    results[label] = evaluate_all(o3, tok, sets, args, context=gated)
    say(args, f"{label}: {results[label]}")
    ramp = choose_ramp(o3, val, val_utility, args)
    label = f"O3, gate on (ramp {ramp['chosen'][0]:g}/{ramp['chosen'][1]:g} chosen on validation)"
    results[label] = evaluate_all(o3, tok, sets, args, context=gated)
    say(args, f"{label}: {results[label]}")
    results["O3, gate off"] = evaluate_all(
        o3, tok, sets, args, context=lambda p: o3.base_model.gate_bypassed()
    )
    say(args, f"O3 gate off: {results['O3, gate off']}")
    # detector AUROC: forgotten tasks' held-out items vs kept tasks' held-out items + utility
    forget_texts = [r["prompt"] for t in args.forget for r in held[t]]
    kept_texts = [r["prompt"] for t in args.keep for r in held[t]] + [r["prompt"] for r in utility]

    def max_score(texts):
        scores = o3.gate_scores(texts)
        return torch.stack(list(scores.values())).max(0).values.numpy()

    det = {
        "auroc": auroc(max_score(forget_texts), max_score(kept_texts)),
        "mean_w_forget_heldout": float(o3.gate_weights(forget_texts).mean()),
        "mean_w_kept": float(o3.gate_weights(kept_texts).mean()),
        "ramp": ramp,
    }
    say(args, f"detector: {det}")
    o3.save_pretrained(out / "o3_adapter")

    # 2b. baselines: one LoRA trained sequentially on the requests
    for label, sign, lr, wrong in (
        ("gradient-ascent LoRA", -1.0, args.ga_lr, False),
        ("random-label LoRA", 1.0, args.unlearn_lr, True),
    ):
        base = get_peft_model(copy.deepcopy(before_model), lora_config(8, 16))
        for name, rows in requests:
            targets = (
                replaced_targets(rows, "", args.seed) if wrong else [r["choices"][r["answer"]] for r in rows]
            )
            losses = train_lora(
                base, encode(tok, rows, targets, args), pad_id, args.unlearn_epochs, lr, args, sign
            )
            say(args, f"{label} {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        results[label] = evaluate_all(base, tok, sets, args)
        say(args, f"{label}: {results[label]}")
        del base

    report = {
        "args": {k: v for k, v in asdict(args).items() if k != "log"},
        "chance": chance,
        "results": results,
        "detector": det,
        "o3_info": {k: {kk: vv for kk, vv in v.items() if kk != "lm_losses"} for k, v in info.items()},
        "seconds": time.time() - t0,
        "torch_threads": torch.get_num_threads(),
    }
    table = format_table(report)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(table + "\n")
    (out / "log.txt").write_text("\n".join(args.log) + "\n")
    print(table, flush=True)
    return report


def format_table(report: dict) -> str:
    results, chance = report["results"], report["chance"]
    cols = list(chance)
    header = "| model | " + " | ".join(cols) + " |"
    lines = [
        header,
        "|" + "---|" * (len(cols) + 1),
        "| chance | " + " | ".join(f"{chance[c]:.3f}" for c in cols) + " |",
    ]
    for name, accs in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{accs[c]:.3f}" for c in cols) + " |")
    det = report["detector"]
    lines.append("")
    lines.append(
        f"Detector AUROC (forgotten held-out vs kept + utility): {det['auroc']:.3f}; mean gate weight: "
        f"forgotten held-out {det['mean_w_forget_heldout']:.3f}, kept + utility {det['mean_w_kept']:.3f} "
        f"(ramp {det['ramp']['chosen'][0]:g}/{det['ramp']['chosen'][1]:g}, chosen among "
        f"{', '.join(det['ramp']['grid'])} by validation mean w forgotten - kept, "
        f"{report['args']['n_val']} validation items per task). "
        f"Wall time {report['seconds'] / 60:.1f} min, {report['torch_threads']} torch threads."
    )
    return "\n".join(lines)


def parse(argv: Optional[list[str]] = None) -> BenchArgs:
    d = BenchArgs()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--forget", nargs="+", default=list(d.forget))
    p.add_argument("--keep", nargs="+", default=list(d.keep))
    p.add_argument("--utility", default=d.utility)
    for name in (
        "n_train",
        "n_eval",
        "n_val",
        "max_options",
        "max_length",
        "finetune_epochs",
        "unlearn_epochs",
        "detector_epochs",
        "batch_size",
        "eval_batch_size",
        "seed",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("finetune_lr", "unlearn_lr", "ga_lr", "gate_full_z", "gate_zero_z"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--out", default=d.out)
    p.add_argument("--tiny", action="store_true", help="random tiny LM and detector (smoke test)")
    p.add_argument("--tiny-detector", default=None, help="detector folder (default: the cached MiniLM)")
    ns = p.parse_args(argv)
    values = vars(ns)
    values["forget"], values["keep"] = tuple(values["forget"]), tuple(values["keep"])
    return BenchArgs(**values)


if __name__ == "__main__":
    run(parse(sys.argv[1:]))
