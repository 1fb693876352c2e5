"""O3's inference gate: per-sample weights ``w(x) = max_t w_t(x)`` that scale the adapter contribution.

How the model's forward gets each sample's text (documented in the README):

1. ``with model.gate_inputs(texts=[...]):`` (or ``weights=tensor``) around the forward / ``generate`` call:
   explicit texts (one per sample of the batch) or explicit weights;
2. otherwise a forward pre-hook on the base model decodes ``input_ids`` (pad positions dropped through
   ``attention_mask``) with the LM's tokenizer (``O3Config.gate_tokenizer`` or ``base_model_name_or_path``)
   and scores the decoded texts. Steps of ``generate`` that only extend a KV cache reuse the weights of the
   prompt.

A :class:`GateState` is shared by the model and its layers; it holds, per adapter, the detector and the
per-request statistics (:class:`~ortho_adapters.o3.scores.RequestStats`), which are saved with the adapter
under ``o3_gate.<request>.*`` keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .config import O3Config
from .detector import Detector
from .scores import RequestStats, aggregate, check_ramp, ramp, soft_weight

REQUEST_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_request_name(name: str) -> None:
    if not isinstance(name, str) or not REQUEST_NAME.match(name):
        raise ValueError(f"O3 request name must match [A-Za-z0-9_-]+, got {name!r}")


@dataclass
class AdapterGate:
    """One adapter's detector and calibrated requests."""

    config: O3Config
    detector: Optional[Detector] = None
    stats: dict[str, RequestStats] = field(default_factory=dict)

    def get_detector(self) -> Detector:
        if self.detector is None:
            c = self.config
            self.detector = Detector(
                c.detector_model, c.detector_r, c.detector_alpha, c.detector_targets, c.detector_max_length
            )
        return self.detector

    def weights(self, texts: Sequence[str]) -> torch.Tensor:
        """``max_t w_t(x)`` for every text (B,), in [0, 1]; zeros when no request is calibrated."""
        if not self.stats:
            return torch.zeros(len(texts))
        detector = self.get_detector()
        per_request = []
        for name, stats in self.stats.items():
            feats = detector.features(name, texts)
            per_request.append(soft_weight(stats, aggregate(stats, feats)))
        return torch.stack(per_request).max(0).values

    def scores(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Aggregated detector score ``s_t(x)`` of every calibrated request (for AUROC)."""
        detector = self.get_detector()
        return {name: aggregate(stats, detector.features(name, texts)) for name, stats in self.stats.items()}


class GateState:
    """Per-adapter gates plus the weights the layers read during the current forward."""

    def __init__(self) -> None:
        self.gates: dict[str, AdapterGate] = {}
        self.current: dict[str, Optional[torch.Tensor]] = {}
        self.texts: Optional[list[str]] = None
        self.explicit: Optional[torch.Tensor] = None
        self.bypass = False
        self.lm_tokenizer: Any = None
        self._cache: Optional[tuple] = None
        self._last: Optional[dict] = None

    # ----- what the layers ask ---------------------------------------------------------------------
    def is_gated(self, adapter_name: str) -> bool:
        gate = self.gates.get(adapter_name)
        return gate is not None and gate.config.gate and bool(gate.stats)

    def weights_for(self, adapter_name: str) -> Optional[torch.Tensor]:
        return self.current.get(adapter_name)

    # ----- registry ----------------------------------------------------------------------------------
    def gate(self, adapter_name: str, config: O3Config) -> AdapterGate:
        if adapter_name not in self.gates:
            self.gates[adapter_name] = AdapterGate(config)
        self.gates[adapter_name].config = config
        return self.gates[adapter_name]

    def set_ramp(self, adapter_name: str, config: O3Config, full_z: float, zero_z: float) -> None:
        """Move every calibrated request's ramp of ``adapter_name`` (nothing refitted) and record the values
        in ``config``; invalid values raise before anything changes."""
        check_ramp(full_z, zero_z)
        gate = self.gate(adapter_name, config)
        for stats in gate.stats.values():
            stats.ramp = ramp(stats.center, full_z, zero_z)
        config.gate_full_z, config.gate_zero_z = float(full_z), float(zero_z)
        self._cache = None  # weights cached for the current explicit texts are stale

    def drop(self, adapter_name: str) -> None:
        self.gates.pop(adapter_name, None)
        self.current.pop(adapter_name, None)

    # ----- explicit inputs ---------------------------------------------------------------------------
    @contextmanager
    def inputs(
        self, texts: Optional[Sequence[str]] = None, weights: Optional[torch.Tensor] = None
    ) -> Iterator[None]:
        if (texts is None) == (weights is None):
            raise ValueError(
                "give exactly one of `texts` (one string per sample) or `weights` (one value per sample)"
            )
        if texts is not None and (isinstance(texts, str) or not all(isinstance(t, str) for t in texts)):
            raise ValueError("`texts` must be a list of strings, one per sample of the batch")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
            if ((weights < 0) | (weights > 1)).any() or not torch.isfinite(weights).all():
                raise ValueError("gate `weights` must lie in [0, 1]")
        saved = (self.texts, self.explicit)
        self.texts = list(texts) if texts is not None else None
        self.explicit = weights
        self._cache = None
        try:
            yield
        finally:
            self.texts, self.explicit = saved

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Every sample gets ``w = 1`` (training a request's LoRA)."""
        saved = self.bypass
        self.bypass = True
        try:
            yield
        finally:
            self.bypass = saved

    # ----- the forward pre-hook's work ---------------------------------------------------------------
    def _decode(self, kwargs: dict, args: tuple, base_name: Optional[str]) -> list[str]:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        if ids is None:
            raise ValueError(
                "the O3 gate needs each sample's text: wrap the call in `with model.gate_inputs(texts=[..])` "
                "(or weights=...), or pass input_ids and set O3Config.gate_tokenizer"
            )
        tokenizer = self._tokenizer(base_name)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}"
            )
        texts = []
        for row in range(ids.shape[0]):
            tokens = ids[row] if mask is None else ids[row][mask[row].bool()]
            texts.append(tokenizer.decode(tokens.tolist(), skip_special_tokens=True))
        return texts

    def _tokenizer(self, base_name: Optional[str]) -> Any:
        if self.lm_tokenizer is not None:
            return self.lm_tokenizer
        from ..core.compat import load_tokenizer

        candidates = [g.config.gate_tokenizer for g in self.gates.values() if g.config.gate_tokenizer]
        candidates.append(base_name)
        for path in candidates:
            if path and Path(path).is_dir():
                self.lm_tokenizer = load_tokenizer(path)
                return self.lm_tokenizer
        raise ValueError(
            "the O3 gate cannot turn input_ids into text: no LM tokenizer folder (O3Config.gate_tokenizer), "
            "or wrap the call in `with model.gate_inputs(texts=[...])`"
        )

    def prepare(self, active: Sequence[str], args: tuple, kwargs: dict, base_name: Optional[str]) -> None:
        """Set ``current[adapter]`` for this forward (None = w 1)."""
        self.current = {}
        gate_on = [name for name in active if name in self.gates and self.gates[name].config.gate]
        if self.bypass or not gate_on:
            return
        if self.explicit is not None:
            for name in gate_on:
                self.current[name] = self.explicit
            return
        gated = [name for name in gate_on if self.gates[name].stats]
        if not gated:  # no request calibrated yet: nothing to gate with, w = 1
            return
        # generate() steps after the prompt only extend a KV cache (``cache`` in transformers 5,
        # ``past_key_values`` before): reuse the prompt's weights
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        extending = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is not None and mask is not None and mask.dim() == 2 and mask.shape[1] > ids.shape[1]:
            extending = True
        if extending and self._last is not None:
            self.current = dict(self._last)
            return
        texts = self.texts if self.texts is not None else self._decode(kwargs, args, base_name)
        if self.texts is not None and self._cache is not None and self._cache[0] is self.texts:
            self.current = dict(self._cache[1])
        else:
            for name in gated:
                self.current[name] = self.gates[name].weights(texts)
            if self.texts is not None:
                self._cache = (self.texts, dict(self.current))
        self._last = dict(self.current)

    # ----- save / load -------------------------------------------------------------------------------
    def state_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``{"<request>.<field>": tensor, "<request>.detector.<lora key>": tensor}`` of one adapter."""
        gate = self.gates.get(adapter_name)
        out: dict[str, torch.Tensor] = {}
        if gate is None:
            return out
        for request, stats in gate.stats.items():
            for key, tensor in stats.tensors().items():
                out[f"{request}.{key}"] = tensor
            for key, tensor in gate.get_detector().lora_state(request).items():
                out[f"{request}.detector.{key}"] = tensor
        return out

    def load_tensors(self, adapter_name: str, config: O3Config, tensors: dict[str, torch.Tensor]) -> None:
        """Rebuild the gate of ``adapter_name`` exactly from :meth:`state_tensors`' output."""
        per_request: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            request, _, rest = key.partition(".")
            per_request.setdefault(request, {})[rest] = tensor
        unknown = set(per_request) - set(config.requests)
        if unknown:
            raise ValueError(
                f"saved O3 gate has requests {sorted(unknown)} not in the config's {config.requests}"
            )
        gate = self.gate(adapter_name, config)
        gate.stats = {}
        detector = gate.get_detector()
        for request in config.requests:
            if request not in per_request:
                continue
            parts = per_request[request]
            lora = {k.removeprefix("detector."): v for k, v in parts.items() if k.startswith("detector.")}
            if request not in detector.requests:
                detector.load_request(request, lora)
            gate.stats[request] = RequestStats.from_tensors(parts)
