"""Arguments of ``ortho-adapters finetune`` and their defaults per model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..tasks import TASK_NAMES, check_task_name
from .methods import CAUSAL_LM, ENCODER

MODELS: dict[str, str] = {"minilm": ENCODER, "smollm2": CAUSAL_LM}
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CAUSAL_LM_TASKS: tuple[str, ...] = ("rotten_tomatoes", *TASK_NAMES)
# Causal-LM tasks whose prompt frame (four sentence-long options) does not fit the model's default length.
TASK_MAX_LENGTH: dict[str, int] = {"logiqa": 512}

# Defaults of the fields left at None, per model. MiniLM's are the original main job's.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "minilm": {
        "epochs": 2.0,
        "batch_size": 16,
        "max_length": 64,
        "n_train": 2000,
        "n_eval": 1000,
        "targets": ["query", "value", "output.dense"],
        "compare": ["baseline", "lora"],
        "init_samples": 256,
    },
    "smollm2": {
        "epochs": 1.0,
        "batch_size": 8,
        "max_length": 256,
        "n_train": 512,
        "n_eval": 500,
        "targets": SMOLLM2_TARGETS,
        "compare": ["zeroshot", "lora"],
        "init_samples": 16,
    },
}


@dataclass
class FinetuneArgs:
    """Arguments of ``ortho-adapters finetune``; ``None`` fields take the model's default (``resolve``)."""

    method: str = "lora_sb"
    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    r: Optional[int] = None
    lr: Optional[float] = None
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    eval_batch_size: int = 16
    max_length: Optional[int] = None
    n_train: Optional[int] = None
    n_eval: Optional[int] = None
    targets: Optional[list[str]] = None
    compare: Optional[list[str]] = None
    warmup_ratio: float = 0.06
    init_samples: Optional[int] = None
    init_svd: str = "auto"
    quantize: Optional[str] = None
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str = "outputs/finetune"
    progress: bool = True
    save_adapter: bool = True

    @property
    def family(self) -> str:
        """:data:`ENCODER` or :data:`CAUSAL_LM`."""
        return MODELS[self.model]


def resolve(args: FinetuneArgs) -> FinetuneArgs:
    """A copy of ``args`` with the model's defaults filled in and the combination checked."""
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose one of {sorted(MODELS)}")
    tasks = CAUSAL_LM_TASKS if args.family == CAUSAL_LM else ("rotten_tomatoes",)
    if args.dataset not in tasks:
        if args.family == CAUSAL_LM:
            check_task_name(args.dataset)  # a retired BIG-bench task: the error names its replacement
        raise ValueError(f"unknown task {args.dataset!r} for {args.model}; choose one of {list(tasks)}")
    if args.quantize not in (None, "none", "4bit"):
        raise ValueError(f"--quantize must be '4bit' or 'none', got {args.quantize!r}")
    if args.family == ENCODER and args.quantize not in (None, "none"):
        raise ValueError("--quantize is supported for the causal-LM job (--model smollm2) only")
    defaults = dict(MODEL_DEFAULTS[args.model])
    if args.family == CAUSAL_LM and args.dataset in TASK_MAX_LENGTH:
        defaults["max_length"] = TASK_MAX_LENGTH[args.dataset]
    filled = {k: v for k, v in defaults.items() if getattr(args, k) is None}
    quantize = None if args.quantize == "none" else args.quantize
    return dataclasses.replace(args, quantize=quantize, **filled)


def training_arguments(args: FinetuneArgs, name: str, lr: float, warmup_steps: int, **overrides: Any):
    """The ``TrainingArguments`` every finetune arm trains with (linear schedule, no checkpoints saved).

    ``overrides`` adds or replaces keywords (e.g. ``logging_steps``, activation checkpointing).
    """
    import torch
    from transformers import TrainingArguments

    keywords: dict[str, Any] = dict(
        output_dir=str(Path(args.output_dir) / "trainer" / name),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        remove_unused_columns=False,
        disable_tqdm=not args.progress,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )
    keywords.update(overrides)
    return TrainingArguments(**keywords)
