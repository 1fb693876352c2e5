"""The encoder job: MiniLM-L6 with masked mean pooling + a linear head, fine-tuned on Rotten Tomatoes.

MiniLM is a sentence-embedding model whose CLS pooler is weak (a linear head on its frozen CLS pooler
reaches 0.675 on Rotten Tomatoes, on mean pooling 0.784), so the head reads the masked mean of the
last hidden states. The head is trained in every arm; the frozen-embedding logistic regression is the
floor any adapter must beat.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from transformers.modeling_outputs import SequenceClassifierOutput

from .. import data
from .args import FinetuneArgs, resolve, training_arguments
from .methods import ENCODER, get_method, gradient_init
from .report import RunResult


class MeanPoolClassifier(nn.Module):
    """``logits = W_c dropout(mean_pool(encoder(x))) + b_c``; cross-entropy loss when ``labels`` are given."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return data.mean_pool(hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        logits = self.classifier(self.dropout(self.embed(input_ids, attention_mask, **extra)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_task(args: FinetuneArgs) -> datasets.DatasetDict:
    """Tokenized Rotten Tomatoes train/test splits (MiniLM tokenizer, padded to ``max_length``)."""
    args = resolve(args)
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
    encoder, _ = data.load_minilm()
    encoder.pooler = None  # mean pooling replaces the (weak) CLS pooler, which would get no gradient
    torch.manual_seed(seed)
    return MeanPoolClassifier(encoder, num_labels=2)


@torch.no_grad()
def embed_all(model: MeanPoolClassifier, dataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled embeddings and labels of a tokenized split."""
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


def adapter_parameter_count(model: nn.Module) -> int:
    """Trainable values of the adapter itself (a ``modules_to_save`` head, trained by every arm, excluded)."""
    return sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n
    )


def warmup_steps_for(n_train: int, args: FinetuneArgs) -> int:
    """Linear warm-up steps: ``warmup_ratio`` of the optimizer steps (at least 1 when the ratio is > 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total_steps = math.ceil(n_train / (args.batch_size * world)) * args.epochs
    return max(1, round(args.warmup_ratio * total_steps)) if args.warmup_ratio > 0 else 0


def train_method(name: str, splits, args: FinetuneArgs, save_dir: Optional[Path] = None) -> RunResult:
    """Fine-tune one adapter method through ``Trainer`` and return held-out accuracy and cost."""
    from transformers import Trainer

    args = resolve(args)
    spec = get_method(name)
    r, lr = spec.defaults(ENCODER)
    r = args.r if (args.r is not None and name == args.method) else r
    lr = args.lr if (args.lr is not None and name == args.method) else lr
    config = spec.build(list(args.targets), r, ["classifier"])
    model = build_classifier(args.seed)
    warmup_steps = warmup_steps_for(len(splits["train"]), args)
    start = time.perf_counter()
    init_info: dict = {}
    if spec.gradient_init:
        # eta = the learning rate of the first warm-up step, as in the official LoRA-SB code
        loader = DataLoader(splits["train"], batch_size=args.batch_size, shuffle=False)
        model.train()
        init_info = gradient_init(
            model, loader, config, args.init_samples, lr, warmup_steps, args.progress, args.init_svd
        )
    model = get_peft_model(model, config)
    training_args = training_arguments(
        args, name, lr, warmup_steps, per_device_eval_batch_size=64, logging_steps=25
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=splits["train"])
    train_start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - train_start
    eval_start = time.perf_counter()
    prediction = trainer.predict(splits["test"])
    accuracy = float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
    eval_seconds = time.perf_counter() - eval_start
    if save_dir is not None and args.save_adapter:  # every process: a ZeRO-3 adapter is gathered to save
        model.save_pretrained(str(save_dir), is_main_process=trainer.is_world_process_zero())
    return RunResult(
        name,
        accuracy,
        adapter_parameter_count(model),
        seconds_per_step=seconds / max(output.global_step, 1),
        train_seconds=(train_start - start) + seconds,
        eval_seconds=eval_seconds,
        extra={"r": r, "lr": lr, "train_loss": float(output.training_loss), **init_info},
    )
