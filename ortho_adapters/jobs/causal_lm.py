"""The causal-LM job: SmolLM2-135M-Instruct fine-tuned on one task with an adapter (one arm per call).

An arm is ``zeroshot`` (no training) or a method of :mod:`.methods`. Training runs through the HF
``Trainer`` on the correct answer of each training example (loss on the answer tokens only); the
held-out examples are scored by option log-likelihood (classification, multiple choice) or greedy
generation with exact match (``arithmetic``). ``--quantize 4bit`` loads the base QLoRA style
(bitsandbytes nf4, fp32 compute, double quantization); the adapters wrap the 4-bit layers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import data
from ..core.compat import dtype_kwarg
from .args import FinetuneArgs, resolve, training_arguments
from .encoder import adapter_parameter_count, warmup_steps_for
from .lm_tasks import LMExample, get_task, load_examples
from .methods import CAUSAL_LM, ZEROSHOT, get_method, gradient_init
from .report import RunResult, is_main_process, peak_rss_mb
from .scoring import (
    LeftPadCollator,
    choice_accuracy,
    exact_match,
    generate_answers,
    score_choices,
    training_features,
)

CHECKPOINTING_KWARGS = {"use_reentrant": False}


def load_model(quantize: Optional[str] = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct in fp32, or with an nf4 4-bit base (``quantize="4bit"``), and its tokenizer."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = data.convert_smollm2()
    tokenizer = data.load_smollm2_tokenizer()
    if quantize is None:
        fp32 = dtype_kwarg(torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, **fp32, local_files_only=True)
    elif quantize == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb, **dtype_kwarg(torch.float32), local_files_only=True
        )
    else:
        raise ValueError(f"quantize must be None or '4bit', got {quantize!r}")
    return model, tokenizer


def checkpointing_arguments(enabled: bool) -> dict:
    """``TrainingArguments`` keywords for non-reentrant activation (gradient) checkpointing.

    transformers 5.2x renamed ``gradient_checkpointing*`` to ``activation_checkpointing*`` (the old names
    warn); older 5.x only knows the old ones.
    """
    from transformers import TrainingArguments

    if not enabled:
        return {}
    prefix = (
        "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    )
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": dict(CHECKPOINTING_KWARGS)}


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    examples: list[LMExample],
    args: FinetuneArgs,
) -> float:
    """Held-out accuracy: option log-likelihood argmax, or exact match of greedy generation."""
    if get_task(task).generative:
        longest = max(len(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) for ex in examples)
        replies = generate_answers(
            model, tokenizer, [ex.prompt for ex in examples], longest + 2, args.eval_batch_size, args.progress
        )
        return exact_match(replies, [ex.target for ex in examples])
    scores = score_choices(model, tokenizer, examples, args.eval_batch_size, args.progress)
    return choice_accuracy(scores, examples)


def train_arm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    train: list[LMExample],
    args: FinetuneArgs,
) -> tuple[nn.Module, dict]:
    """Build arm ``name``'s adapter (LoRA-SB: gradient init first) and train it with ``Trainer``."""
    from transformers import Trainer

    spec = get_method(name)
    r, lr = spec.defaults(CAUSAL_LM)
    r = args.r if (args.r is not None and name == args.method) else r
    lr = args.lr if (args.lr is not None and name == args.method) else lr
    config = spec.build(list(args.targets), r, None)
    if args.quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    rows = [training_features(tokenizer, ex) for ex in train]
    collator = LeftPadCollator(tokenizer.pad_token_id)
    warmup_steps = warmup_steps_for(len(rows), args)
    start = time.perf_counter()
    init_info: dict = {}
    if spec.gradient_init:
        loader = DataLoader(rows, batch_size=args.batch_size, shuffle=False, collate_fn=collator)
        model.train()
        init_info = gradient_init(
            model, loader, config, args.init_samples, lr, warmup_steps, args.progress, args.init_svd
        )
    model = get_peft_model(model, config)
    init_seconds = time.perf_counter() - start
    training_args = training_arguments(
        args, name, lr, warmup_steps, logging_steps=10, **checkpointing_arguments(args.gradient_checkpointing)
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collator)
    train_start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - train_start
    return model, {
        "r": r if r is not None else "full",
        "lr": lr,
        "train_loss": float(output.training_loss),
        "steps": output.global_step,
        "init_seconds": init_seconds,
        **init_info,
        "train_seconds": init_seconds + seconds,
        "seconds_per_step": seconds / max(output.global_step, 1),
    }


def run_arm(name: str, args: FinetuneArgs, save_dir: Optional[Path] = None) -> RunResult:
    """Train (unless ``zeroshot``) and evaluate one arm in this process; peak RSS is the process's."""
    args = resolve(args)
    if name != ZEROSHOT:
        get_method(name)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.quantize)
    train, test = load_examples(
        tokenizer, args.dataset, args.n_train, args.n_eval, args.max_length, args.seed
    )
    info: dict = {"r": None, "lr": None}
    if name != ZEROSHOT:
        model, info = train_arm(model, tokenizer, name, train, args)
    eval_start = time.perf_counter()
    accuracy = evaluate(model, tokenizer, args.dataset, test, args)
    eval_seconds = time.perf_counter() - eval_start
    if save_dir is not None and args.save_adapter and name != ZEROSHOT:
        # every process calls it (a ZeRO-3 save gathers, a collective); only the first one writes
        model.save_pretrained(str(save_dir), is_main_process=is_main_process())
    extra = {
        **{k: v for k, v in info.items() if k not in ("train_seconds", "seconds_per_step")},
        "targets": ",".join(args.targets) if name != ZEROSHOT else "-",
        "quantize": args.quantize,
        "task": args.dataset,
        "n_train": len(train),
        "n_eval": len(test),
    }
    return RunResult(
        name,
        accuracy,
        adapter_parameter_count(model) if name != ZEROSHOT else 0,
        seconds_per_step=info.get("seconds_per_step", float("nan")),
        train_seconds=info.get("train_seconds", 0.0),
        eval_seconds=eval_seconds,
        peak_rss_mb=peak_rss_mb(),
        extra=extra,
    )
