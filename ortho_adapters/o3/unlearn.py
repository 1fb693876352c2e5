"""One O3 unlearning request end to end: replaced-target LoRA training + detector fit + gate calibration.

``forget_data`` rows are dicts with ``prompt`` (str) and, for multiple choice, ``choices`` (the answer
continuations, e.g. ``[" A", " B", " C"]``) and ``answer`` (index). The LM is trained on the forget data only
(no retained data, arXiv 2407.10223): multiple choice -> a random wrong choice, generation (no ``choices``)
-> ``refusal``; loss ``CE + lambda * mean_layers sum_{i<t} ||A_i A_t^T||_F^2``. The gate's detector is
trained on 80% of the prompts and calibrated on the other 20% (an optional ``text`` key overrides the
prompt as the detector's text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..core.trainer import PenaltyTrainer
from .config import O3Config
from .gate import check_request_name
from .penalty import orthogonality_penalty
from .scores import fit_stats

DEFAULT_REFUSAL = " I'm sorry, I can't help with that."


def _o3_base(model: Any, adapter_name: Optional[str]) -> tuple[Any, str, O3Config]:
    from .model import O3Model

    base = getattr(model, "base_model", None)
    if not isinstance(base, O3Model):
        raise ValueError(
            "unlearn() needs a PeftModel made with an O3Config (get_peft_model(base, O3Config()))"
        )
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"model has no adapter {name!r}; adapters: {list(model.peft_config)}")
    return base, name, model.peft_config[name]


def replaced_targets(rows: Sequence[dict], refusal: str, seed: int) -> list[str]:
    """A random wrong choice per multiple-choice row, ``refusal`` for a generation row (seeded)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for row in rows:
        choices = row.get("choices")
        if choices:
            wrong = [i for i in range(len(choices)) if i != row["answer"]]
            targets.append(choices[wrong[int(torch.randint(len(wrong), (1,), generator=g))]])
        else:
            targets.append(refusal)
    return targets


def _validate(rows: Sequence[dict], holdout: float) -> None:
    if isinstance(rows, (str, bytes)) or len(rows) < 3:
        raise ValueError("forget_data must be a sequence of at least 3 rows (dicts with a 'prompt')")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"forget_data[{i}] must be a dict with a str 'prompt'")
        choices = row.get("choices")
        if choices is not None:
            if (
                len(choices) < 2
                or not isinstance(row.get("answer"), int)
                or not 0 <= row["answer"] < len(choices)
            ):
                raise ValueError(f"forget_data[{i}] needs >= 2 choices and an 'answer' index into them")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")


def encode_rows(
    tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], max_length: int
) -> list[dict]:
    """``input_ids`` = prompt + target tokens (prompt cut from the left), ``labels`` on the target only."""
    rows = []
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        p = p[-max(1, max_length - len(t)) :]
        rows.append({"input_ids": p + t, "labels": [-100] * len(p) + t})
    return rows


def _pad(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class O3Trainer(PenaltyTrainer):
    """``transformers.Trainer`` whose loss adds O3's ``lambda * orthogonality penalty`` (gate bypassed)."""

    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        peft_model = self.accelerator.unwrap_model(model)
        lam = peft_model.peft_config[peft_model.active_adapter].orth_lambda
        return lam * orthogonality_penalty(peft_model) if lam else None

    def train(self, *args, **kwargs):
        with self.accelerator.unwrap_model(self.model).base_model.gate_bypassed():
            return super().train(*args, **kwargs)


def train_loop(model, rows, pad_id, lam, epochs, lr, batch_size, seed, sign: float = 1.0) -> list[float]:
    """AdamW on ``sign * CE + lam * orthogonality penalty`` over padded ``rows`` (sign -1: ascent)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    device = next(p.device for p in params)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        for start in range(0, len(order), batch_size):
            batch = {
                k: v.to(device)
                for k, v in _pad([rows[i] for i in order[start : start + batch_size]], pad_id).items()
            }
            loss = sign * model(**batch).loss
            if lam:
                loss = loss + lam * orthogonality_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


def unlearn(
    model: Any,
    forget_data: Sequence[dict],
    name: str,
    *,
    tokenizer: Any,
    refusal: str = DEFAULT_REFUSAL,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 256,
    holdout: float = 0.2,
    seed: int = 0,
    detector_epochs: int = 3,
    detector_lr: float = 1e-3,
    detector_batch_size: int = 16,
    training_args: Any = None,
    adapter_name: Optional[str] = None,
) -> dict[str, Any]:
    """Unlearn ``forget_data`` as request ``name`` of the O3 adapter of ``model`` (a ``PeftModel``).

    1. freezes the previous request's LoRA and starts a new one (``B = 0``);
    2. trains it on ``prompt + replaced target`` with ``CE + orth_lambda * penalty`` (gate bypassed), with a
       plain AdamW loop, or with :class:`O3Trainer` when ``training_args`` (``TrainingArguments``) is given;
    3. with ``config.gate``: trains the detector's LoRA for ``name`` on 80% of the texts, fits the per-layer
       statistics on them and calibrates the soft weight on the held-out 20%.

    Returns the training losses, the held-out gate weights and the split sizes.
    """
    base, adapter, config = _o3_base(model, adapter_name)
    check_request_name(name)
    if name in config.requests:
        raise ValueError(f"O3 request {name!r} already exists: {config.requests}")
    _validate(forget_data, holdout)
    if model.active_adapter != adapter:
        raise ValueError(f"set adapter {adapter!r} active before unlearning into it")

    prompts = [row["prompt"] for row in forget_data]
    texts = [row.get("text", row["prompt"]) for row in forget_data]
    targets = replaced_targets(forget_data, refusal, seed)
    rows = encode_rows(tokenizer, prompts, targets, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    if config.gate:  # load the detector encoder first: a missing folder fails before the model changes
        base.o3_gate_state.gate(adapter, config).get_detector()
    base.start_request(name, adapter)
    info: dict[str, Any] = {"request": name}
    with base.gate_bypassed():
        if training_args is None:
            info["lm_losses"] = train_loop(
                model, rows, pad_id, config.orth_lambda, epochs, lr, batch_size, seed
            )
        else:
            import datasets
            from transformers import DataCollatorForSeq2Seq

            trainer = O3Trainer(
                model=model,
                args=training_args,
                train_dataset=datasets.Dataset.from_list(rows),
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            )
            trainer.train()
            info["lm_losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            model.eval()
    with torch.no_grad():
        info["penalty"] = float(orthogonality_penalty(model, adapter))

    if config.gate:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        n_cal = max(1, round(holdout * len(texts)))
        cal = [texts[i] for i in order[:n_cal]]
        fit = [texts[i] for i in order[n_cal:]]
        gate = base.o3_gate_state.gate(adapter, config)
        detector = gate.get_detector()
        info["detector_losses"] = detector.train_request(
            name, fit, epochs=detector_epochs, lr=detector_lr, batch_size=detector_batch_size, seed=seed
        )
        stats = fit_stats(
            detector.features(name, fit), detector.features(name, cal), config.gate_full_z, config.gate_zero_z
        )
        gate.stats[name] = stats
        info["heldout_weights"] = gate.weights(cal).tolist()
        info["n_fit"], info["n_heldout"] = len(fit), len(cal)
    return info
