"""Every switch on the installed PEFT / transformers version, in one place.

Supported: peft >= 0.18 (0.18.1, 0.20.0 and 0.21.2 tested) and transformers >= 4.51 (4.51.3 and 5.25 tested).
Everything else in the package calls the helpers here instead of asking for a version or probing PEFT.

What differs:

* peft 0.20 added quantization backends (``resolve_quantization_backend``; ``get_base_weight`` /
  ``set_base_weight`` on tuner layers). Before it, :func:`quantization_backend` returns a small equivalent
  for bitsandbytes 8/4-bit layers built on ``peft.utils.integrations.dequantize_bnb_weight``.
* peft 0.21 added the tuner hooks ``_get_adapter_state_dict`` / ``_remove_adapter_name_from_key`` /
  ``_remap_adapter_state_dict_for_load`` that O3 needs to save its gate and its nested LoRA keys. Before it,
  O3's save and load raise (:func:`require_tuner_state_dict_hooks`) instead of writing an adapter that
  reloads as the base model.
* transformers 4.x keeps a warm-up ratio in ``warmup_ratio`` (``warmup_steps`` is an int there),
  ``from_pretrained`` / ``from_config`` take ``torch_dtype=`` (``dtype=`` from 5.0), a KV cache is
  ``past_key_values`` (``cache`` in recent 5.x), and a tokenizer folder written by 5.x names a class 4.x
  lacks (:func:`load_tokenizer`).
* transformers 4.51.3 refuses to load a bitsandbytes model on a CPU; 4.57.6 loads it (``needs("4bit-cpu")``).

Not a version switch: peft < 0.20's ``delete_adapter`` trips over our prefix-less ``adapter_dropout``;
:meth:`~ortho_adapters.core.model.OrthoTuner.delete_adapter` empties it first on every version.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import peft
import torch
import transformers
from packaging.version import Version
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

PEFT_VERSION = Version(peft.__version__)
TRANSFORMERS_VERSION = Version(transformers.__version__)

#: peft >= 0.21 calls the tuner's state-dict hooks (O3's gate and nested keys depend on them)
HAS_TUNER_STATE_DICT_HOOKS = hasattr(BaseTuner, "_remap_adapter_state_dict_for_load")
#: transformers >= 5: ``dtype=`` in ``from_pretrained``, a float ``warmup_steps`` that may be a ratio
TRANSFORMERS_5 = TRANSFORMERS_VERSION >= Version("5")

try:  # peft >= 0.20
    from peft.utils import resolve_quantization_backend as _peft_backend
except ImportError:  # peft 0.18 / 0.19
    _peft_backend = None


def needs(feature: str) -> Optional[str]:
    """``None`` when ``feature`` works with the installed versions, else the reason it does not (for skips).

    ``feature``: ``"o3-save"`` (O3 save / load: peft >= 0.21), ``"transformers-5"`` (APIs as transformers 5
    spells them, e.g. a ratio in ``TrainingArguments(warmup_steps=0.1)``), ``"4bit-cpu"``
    (``from_pretrained`` with a bitsandbytes config on a CPU: 4.51.3 refuses, 4.57.6 and 5.25 load).
    """
    if feature == "4bit-cpu":  # transformers 4.51.3: "None of the available devices ... are supported"
        if TRANSFORMERS_VERSION >= Version("4.57"):
            return None
        return f"a 4-bit model on the CPU needs transformers >= 4.57 (installed {TRANSFORMERS_VERSION})"
    if feature == "transformers-5":
        return None if TRANSFORMERS_5 else f"needs transformers >= 5 (installed {TRANSFORMERS_VERSION})"
    if feature == "o3-save":
        if HAS_TUNER_STATE_DICT_HOOKS:
            return None
        return f"O3 save / load needs peft >= 0.21 (its tuner state-dict hooks), installed {PEFT_VERSION}"
    raise ValueError(f"unknown feature {feature!r}")


# tuner class -> (model -> the reason its save / load needs the hooks, or None when it does not)
_NEEDS_HOOKS: dict[type, Callable[[nn.Module], Optional[str]]] = {}


def _always(model: nn.Module) -> Optional[str]:
    return "the adapter would not round-trip"


def require_tuner_state_dict_hooks(
    tuner_cls: type, when: Callable[[nn.Module], Optional[str]] = _always
) -> None:
    """Make ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` (and so ``save_pretrained``,
    ``PeftModel.from_pretrained``, ``load_adapter``) raise ``RuntimeError`` for a model of ``tuner_cls`` where
    PEFT does not call the tuner's state-dict hooks (peft < 0.21) and ``when(model)`` gives a reason
    (default: always; O3's saved adapter would reload as the base model). A no-op on peft >= 0.21."""
    if HAS_TUNER_STATE_DICT_HOOKS:
        return
    _NEEDS_HOOKS[tuner_cls] = when
    import sys

    from peft.utils import save_and_load

    for name in ("get_peft_model_state_dict", "set_peft_model_state_dict"):
        original = getattr(save_and_load, name)
        if getattr(original, "_ortho_guarded", False):
            continue
        guarded = _guarded(original, "save" if name.startswith("get") else "load")
        for module in list(sys.modules.values()):  # every module that imported it (peft_model, utils, ...)
            if getattr(module, "__name__", "").startswith("peft") and getattr(module, name, None) is original:
                setattr(module, name, guarded)


def _guarded(function: Any, action: str) -> Any:
    import functools

    @functools.wraps(function)
    def guarded(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        tuner = getattr(model, "base_model", model)
        reasons = [when(tuner) for cls, when in _NEEDS_HOOKS.items() if isinstance(tuner, cls)]
        reason = next((r for r in reasons if r), None)
        if reason:
            raise RuntimeError(
                f"{type(tuner).__name__}: {action} needs peft >= 0.21 (installed {PEFT_VERSION}): older PEFT "
                f"does not call the tuner's state-dict hooks, so {reason}. "
                "Upgrade with `pip install 'peft>=0.21'`."
            )
        return function(model, *args, **kwargs)

    guarded._ortho_guarded = True
    return guarded


# ------------------------------------------------------------------------------------- layers and weights


class _Bnb8bit:
    """peft < 0.20: the part of PEFT's ``Bnb8bitBackend`` we use."""

    layer_type = "linear"

    def get_base_weight(self, base: nn.Module) -> torch.Tensor:
        from peft.utils.integrations import dequantize_bnb_weight

        if base.state.SCB is None:
            base.state.SCB = base.weight.SCB
        return dequantize_bnb_weight(base.weight, state=base.state)

    def set_base_weight(self, layer: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = layer.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        base.state.reset_grads()

    def maybe_clone_base_result(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Bnb4bit(_Bnb8bit):
    """peft < 0.20: the part of PEFT's ``Bnb4bitBackend`` we use."""

    def get_base_weight(self, base: nn.Module) -> torch.Tensor:
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(base.weight, state=base.weight.quant_state)

    def set_base_weight(self, layer: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = layer.get_base_layer()
        old = base.weight
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(requires_grad=False)
        if "bnb_quantized" in kwargs:
            kwargs["bnb_quantized"] = False
        base.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)

    def maybe_clone_base_result(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # as PEFT does for 4-bit results (backprop through a manipulated view)


def quantization_backend(module: nn.Module) -> Any:
    """PEFT's quantization backend of a base layer (``None`` for an unquantized one): an object with
    ``layer_type``, ``get_base_weight(base)``, ``set_base_weight(tuner_layer, weight)`` and
    ``maybe_clone_base_result(result)``."""
    if _peft_backend is not None:
        return _peft_backend(module)
    if not type(module).__module__.startswith("bitsandbytes"):
        return None  # checked first so that a plain layer never imports bitsandbytes
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear8bitLt):
        return _Bnb8bit()
    if isinstance(module, bnb.nn.Linear4bit):
        return _Bnb4bit()
    return None


def set_base_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` (the stored layout, in the dtype to store) as a tuner layer's base weight."""
    backend = layer.quantization_backend
    if backend is None:
        layer.get_base_layer().weight.data = weight
    else:
        backend.set_base_weight(layer, weight)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear base layer (``nn.Linear`` and subclasses, ``Conv1D``)."""
    from peft.tuners.tuners_utils import _get_in_out_features  # peft >= 0.18

    return _get_in_out_features(module)


# ------------------------------------------------------------------------------------------ transformers


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The keyword ``from_pretrained`` / ``from_config`` take for the dtype (``torch_dtype`` before 5.0)."""
    return {"dtype": dtype} if TRANSFORMERS_5 else {"torch_dtype": dtype}


def output_cache(out: Any) -> tuple[str, Any]:
    """``(keyword, cache)``: a model output's KV cache and the ``forward`` keyword that takes it back
    (``cache`` in recent transformers 5, ``past_key_values`` before)."""
    if getattr(out, "cache", None) is not None:
        return "cache", out.cache
    return "past_key_values", out.past_key_values


def load_tokenizer(path: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``, also for a folder that transformers 5
    wrote (``tokenizer_class: "TokenizersBackend"``, a class 4.x does not have): 4.x reads the same files
    (``tokenizer.json``, config, chat template) as ``PreTrainedTokenizerFast``, so one cache serves both."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    config = Path(path) / "tokenizer_config.json"
    saved_class = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    written_by_5 = saved_class == "TokenizersBackend"
    if TRANSFORMERS_5 or not written_by_5:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # not the saved class name: expected here, the files are the same
    try:
        # 5.x's class feeds a model input_ids and attention_mask only (4.x's adds token_type_ids)
        names = ["input_ids", "attention_mask"]
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True, model_input_names=names)
    finally:
        logging.set_verbosity(level)


def warmup_of(training_args: Any, num_training_steps: Optional[int] = None) -> Any:
    """A ``TrainingArguments``' warm-up as transformers 5 spells it: steps (>= 1 or 0), or a ratio in (0, 1).

    transformers 4.x keeps the ratio in ``warmup_ratio`` and uses it when ``warmup_steps`` is 0; a ratio of
    1 (every step) is returned as ``num_training_steps`` steps (it cannot be told from "1 step" otherwise).
    """
    steps = training_args.warmup_steps
    ratio = getattr(training_args, "warmup_ratio", None)
    if TRANSFORMERS_5 or steps or not ratio:
        return steps
    if ratio < 1:
        return float(ratio)
    if num_training_steps is None:
        raise ValueError(
            "training_args.warmup_ratio=1 warms up over every step: pass num_training_steps= (the optimizer "
            "steps of the whole run) so that eta = learning_rate / num_training_steps can be computed"
        )
    return math.ceil(num_training_steps * ratio)


__all__ = [
    "HAS_TUNER_STATE_DICT_HOOKS",
    "PEFT_VERSION",
    "TRANSFORMERS_5",
    "TRANSFORMERS_VERSION",
    "dtype_kwarg",
    "in_out_features",
    "load_tokenizer",
    "needs",
    "output_cache",
    "quantization_backend",
    "require_tuner_state_dict_hooks",
    "set_base_weight",
    "warmup_of",
]
