"""One O3 unlearning request end to end: replaced-target LoRA training + detector fit + gate calibration.

``forget_data`` rows are dicts with ``prompt`` (str) and, for multiple choice, ``choices`` (the answer
continuations, e.g. ``[" A", " B", " C"]``) and ``answer`` (index). The LM is trained on the forget data only
(no retained data, arXiv 2407.10223): multiple choice -> a random wrong choice, generation (no ``choices``)
-> ``refusal``; loss ``CE + lambda * mean_layers sum_{i<t} ||A_i A_t^T||_F^2``. The gate's detector is
trained on 80% of the prompts and calibrated on the other 20% (an optional ``text`` key overrides the
prompt as the detector's text).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..core.finite import check_finite
from ..core.trainer import PenaltyTrainer
from .config import O3Config
from .gate import check_request_name
from .layer import O3Layer
from .penalty import orthogonality_penalty
from .scores import fit_stats

DEFAULT_REFUSAL = " I'm sorry, I can't help with that."
STEP = "o3.unlearn"


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
    if rows is None or isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__len__"):
        raise ValueError(
            "unlearn: `forget_data` must be a sequence of at least 3 rows (dicts with a 'prompt'), got "
            f"{type(rows).__name__}"
        )
    if len(rows) < 3:
        raise ValueError(
            "unlearn: `forget_data` must be a sequence of at least 3 rows (dicts with a 'prompt'), got "
            f"{len(rows)} rows"
        )
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"forget_data[{i}] must be a dict with a str 'prompt'")
        if not isinstance(row.get("text", ""), str):
            raise ValueError(f"forget_data[{i}]['text'] (the detector's text) must be a str")
        choices = row.get("choices")
        if choices is not None:
            if (
                len(choices) < 2
                or not isinstance(row.get("answer"), int)
                or not 0 <= row["answer"] < len(choices)
            ):
                raise ValueError(f"forget_data[{i}] needs >= 2 choices and an 'answer' index into them")
    if isinstance(holdout, bool) or not isinstance(holdout, numbers.Real) or not 0 < holdout < 1:
        raise ValueError(f"unlearn: `holdout` must be in (0, 1), got {holdout!r}")


def _validate_tokenizer(tokenizer: Any) -> int:
    """The pad id to use; raises naming ``tokenizer`` when it cannot encode and pad the rows."""
    if tokenizer is None:
        raise ValueError(
            "unlearn: `tokenizer` is required (the LM's tokenizer, which encodes the forget rows), got None"
        )
    if not callable(tokenizer):
        raise ValueError(f"unlearn: `tokenizer` must be a callable tokenizer, got {type(tokenizer).__name__}")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else getattr(tokenizer, "eos_token_id", None)
    if not isinstance(pad_id, int):
        raise ValueError("unlearn: `tokenizer` has neither a pad_token_id nor an eos_token_id to pad with")
    return pad_id


def _validate_numbers(**values: Any) -> None:
    """Counts (epochs >= 0, sizes >= 1), learning rates (finite, > 0), an int ``seed``, a str ``refusal``."""
    for name, value in values.items():
        if name in ("lr", "detector_lr"):
            ok = (
                not isinstance(value, bool)
                and isinstance(value, numbers.Real)
                and math.isfinite(value)
                and value > 0
            )
            need = "a finite number > 0"
        elif name == "refusal":
            ok, need = isinstance(value, str) and bool(value), "a non-empty str"
        else:
            low = {"seed": -math.inf, "epochs": 0, "detector_epochs": 0}.get(name, 1)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            need = "an int" if low == -math.inf else f"an int >= {low}"
        if not ok:
            raise ValueError(f"unlearn: `{name}` must be {need}, got {value!r}")


class _Snapshot:
    """The adapter's LM-side state before a request (O3 factors, request lists, train / eval modes, grads).

    :meth:`restore` puts it back exactly (same parameter objects, values copied in), so a failed
    :func:`unlearn` leaves the model as it was.
    """

    def __init__(self, model: nn.Module, adapter: str, config: O3Config) -> None:
        self.adapter, self.config = adapter, config
        self.requests = list(config.requests)
        self.modes = [(m, m.training) for m in model.modules()]
        self.layers = []
        for layer in model.modules():
            if isinstance(layer, O3Layer) and adapter in layer.o3_lora:
                params = [
                    (p, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
                    for p in layer.o3_lora[adapter].parameters()
                ]
                frozen = [
                    c[adapter] if adapter in c else None for c in (layer.o3_frozen_A, layer.o3_frozen_B)
                ]
                self.layers.append((layer, params, frozen, layer.requests[adapter]))

    @torch.no_grad()
    def restore(self) -> None:
        for layer, params, frozen, count in self.layers:
            for p, value, flag, grad in params:
                p.copy_(value)
                p.requires_grad_(flag)
                p.grad = grad
            for container, value in zip((layer.o3_frozen_A, layer.o3_frozen_B), frozen):
                if value is not None:
                    container[self.adapter] = value
                elif self.adapter in container:
                    del container[self.adapter]
            layer.requests[self.adapter] = count
        self.config.requests[:] = self.requests
        for module, mode in self.modes:
            module.training = mode


def _check_request_factors(model: nn.Module, adapter: str, name: str) -> None:
    """Every layer's newly trained LoRA factors are finite (else a bad batch corrupted them)."""
    for module_name, layer in model.named_modules():
        if isinstance(layer, O3Layer) and adapter in layer.o3_lora:
            for factor, param in layer.o3_lora[adapter].named_parameters():
                check_finite(
                    param.detach(),
                    step=STEP,
                    statistic=f"trained factor {factor} of request {name!r}",
                    layer=module_name,
                    hint="a training batch produced NaN / Inf gradients; the request was rolled back",
                )


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
    """AdamW on ``sign * CE + lam * orthogonality penalty`` over padded ``rows`` (sign -1: ascent).

    A NaN / Inf loss raises :class:`~ortho_adapters.core.finite.NonFiniteError` before its backward and step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    device = next(p.device for p in params)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        for start in range(0, len(order), batch_size):
            batch = {
                k: v.to(device)
                for k, v in _pad([rows[i] for i in order[start : start + batch_size]], pad_id).items()
            }
            loss = sign * model(**batch).loss
            if lam:
                loss = loss + lam * orthogonality_penalty(model)
            check_finite(
                loss.detach(),
                step=STEP,
                statistic=f"LM training loss of epoch {epoch}, batch {start // batch_size}",
                hint="a training batch gives a NaN / Inf loss",
            )
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

    Every argument is checked before the model is touched (errors name the argument). A NaN / Inf training
    loss (LM or detector), trained factor, detector feature or fitted gate statistic raises
    :class:`~ortho_adapters.core.finite.NonFiniteError` naming the step, the layer and the value; on that or
    any other error the request is rolled back: factors, request lists, detector LoRAs and gate statistics
    are exactly as before the call.

    Returns the training losses, the held-out gate weights and the split sizes.
    """
    base, adapter, config = _o3_base(model, adapter_name)
    check_request_name(name)
    if name in config.requests:
        raise ValueError(f"O3 request {name!r} already exists: {config.requests}")
    _validate(forget_data, holdout)
    pad_id = _validate_tokenizer(tokenizer)
    opts = dict(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        detector_epochs=detector_epochs,
        detector_lr=detector_lr,
        detector_batch_size=detector_batch_size,
    )
    _validate_numbers(refusal=refusal, max_length=max_length, **opts)
    opts["holdout"] = holdout
    if model.active_adapter != adapter:
        raise ValueError(f"set adapter {adapter!r} active before unlearning into it")

    prompts = [row["prompt"] for row in forget_data]
    texts = [row.get("text", row["prompt"]) for row in forget_data]
    targets = replaced_targets(forget_data, refusal, seed)
    rows = encode_rows(tokenizer, prompts, targets, max_length)

    if config.gate:  # load the detector encoder first: a missing folder fails before the model changes
        base.o3_gate_state.gate(adapter, config).get_detector()
    snapshot = _Snapshot(model, adapter, config)
    detector_had = config.gate and name in base.o3_gate_state.gate(adapter, config).get_detector().requests
    try:
        return _run_request(
            model, base, adapter, config, name, rows, texts, pad_id, tokenizer, training_args, opts
        )
    except BaseException:
        if config.gate:
            gate = base.o3_gate_state.gate(adapter, config)
            gate.stats.pop(name, None)
            if not detector_had:
                gate.get_detector().remove_request(name)
        snapshot.restore()
        raise


def _run_request(
    model, base, adapter, config, name, rows, texts, pad_id, tokenizer, training_args, opts
) -> dict[str, Any]:
    """Steps 1-3 of :func:`unlearn` (arguments already validated); the caller rolls back on an error."""
    base.start_request(name, adapter)
    info: dict[str, Any] = {"request": name}
    with base.gate_bypassed():
        if training_args is None:
            info["lm_losses"] = train_loop(
                model,
                rows,
                pad_id,
                config.orth_lambda,
                opts["epochs"],
                opts["lr"],
                opts["batch_size"],
                opts["seed"],
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
    _check_request_factors(model, adapter, name)
    with torch.no_grad():
        info["penalty"] = float(orthogonality_penalty(model, adapter))

    if config.gate:
        seed = opts["seed"]
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        n_cal = max(1, round(opts["holdout"] * len(texts)))
        cal = [texts[i] for i in order[:n_cal]]
        fit = [texts[i] for i in order[n_cal:]]
        gate = base.o3_gate_state.gate(adapter, config)
        detector = gate.get_detector()
        info["detector_losses"] = detector.train_request(
            name,
            fit,
            epochs=opts["detector_epochs"],
            lr=opts["detector_lr"],
            batch_size=opts["detector_batch_size"],
            seed=seed,
            step=STEP,
        )
        stats = fit_stats(
            detector.features(name, fit),
            detector.features(name, cal),
            config.gate_full_z,
            config.gate_zero_z,
            step=STEP,
        )
        gate.stats[name] = stats  # installed only once every statistic is checked
        info["heldout_weights"] = gate.weights(cal).tolist()
        info["n_fit"], info["n_heldout"] = len(fit), len(cal)
    return info
