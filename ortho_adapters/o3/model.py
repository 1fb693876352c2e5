"""O3 tuner model (PEFT ``BaseTuner``): injects :class:`O3Layer`, owns the gate and its save / load."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..core.compat import require_tuner_state_dict_hooks
from ..core.model import OrthoTuner
from .config import LLAMA_PROJECTIONS, O3Config
from .gate import GateState
from .layer import O3Layer

GATE_KEY = "o3_gate"

# The paper adapts all seven projections; PEFT's LoRA defaults (q, v) for other architectures.
O3_TARGET_MODULES = dict(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
for _arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "smollm3"):
    O3_TARGET_MODULES[_arch] = list(LLAMA_PROJECTIONS)


class O3Model(OrthoTuner):
    """Injects :class:`O3Layer` into the targeted linear layers. Use through ``get_peft_model``.

    The gate (detector + calibration, per adapter) lives in a plain :class:`GateState` object shared with
    the layers; a forward pre-hook on the base model sets each sample's weight before every forward.
    """

    prefix = "o3_"
    tuner_layer_cls = O3Layer
    layer_cls = O3Layer
    target_module_mapping = O3_TARGET_MODULES

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        object.__setattr__(self, "o3_gate_state", GateState())
        super().__init__(model, config, adapter_name, **kwargs)
        self._gate_hook = self.model.register_forward_pre_hook(self._gate_pre_hook, with_kwargs=True)

    # ----- injection ---------------------------------------------------------------------------------
    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kw):
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key, **kw)
        getattr(parent, target_name).o3_gate_state = self.o3_gate_state
        self.o3_gate_state.gate(adapter_name, config)

    def _gate_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        base_name = None
        for name in self.active_adapters:
            if name in self.peft_config:
                base_name = self.peft_config[name].base_model_name_or_path or None
        self.o3_gate_state.prepare(list(self.active_adapters), args, kwargs, base_name)

    # ----- user API ----------------------------------------------------------------------------------
    def gate_inputs(
        self, texts: Optional[Sequence[str]] = None, weights: Optional[torch.Tensor] = None
    ) -> AbstractContextManager[None]:
        """Context: the gate scores ``texts`` (one per sample) or uses ``weights`` (one per sample)."""
        return self.o3_gate_state.inputs(texts=texts, weights=weights)

    def gate_bypassed(self) -> AbstractContextManager[None]:
        """Context: every sample gets ``w = 1`` (used while training a request's LoRA)."""
        return self.o3_gate_state.bypassed()

    def gate_weights(self, texts: Sequence[str], adapter_name: Optional[str] = None) -> torch.Tensor:
        """``w(x) = max_t w_t(x)`` for each text under the adapter's calibrated requests (B,)."""
        name = adapter_name or self.active_adapters[0]
        return self.o3_gate_state.gate(name, self.peft_config[name]).weights(list(texts))

    def gate_scores(
        self, texts: Sequence[str], adapter_name: Optional[str] = None
    ) -> dict[str, torch.Tensor]:
        """The aggregated detector score of each calibrated request for each text."""
        name = adapter_name or self.active_adapters[0]
        return self.o3_gate_state.gate(name, self.peft_config[name]).scores(list(texts))

    def set_gate_ramp(self, full_z: float, zero_z: float, adapter_name: Optional[str] = None) -> None:
        """Move every calibrated request's ramp to ``w = 1`` above ``mu - full_z * sd`` and ``w = 0`` below
        ``mu - zero_z * sd`` (held-out ``mu, sd`` kept from calibration; nothing is refitted), and store the
        values in the config so they are saved with the adapter. Invalid values change nothing."""
        name = adapter_name or self.active_adapters[0]
        self.o3_gate_state.set_ramp(name, self.peft_config[name], full_z, zero_z)

    def start_request(self, name: str, adapter_name: Optional[str] = None) -> None:
        """Begin request ``name``: freeze the current LoRA (if a request owns it) and start a new one."""
        from .gate import check_request_name

        check_request_name(name)
        adapter = adapter_name or self.active_adapters[0]
        config: O3Config = self.peft_config[adapter]
        if name in config.requests:
            raise ValueError(f"O3 request {name!r} already exists in adapter {adapter!r}: {config.requests}")
        if config.requests:
            for module in self.model.modules():
                if isinstance(module, O3Layer) and adapter in module.o3_lora:
                    module.start_request(adapter)
        config.requests.append(name)

    # ----- lifecycle ---------------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.o3_gate_state.drop(adapter_name)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._gate_hook.remove()
        return model

    # ----- save / load of the gate -------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(
            model=model,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        base = getattr(model, "base_model", None)
        if isinstance(base, O3Model):
            for key, tensor in base.o3_gate_state.state_tensors(adapter_name).items():
                out[f"base_model.{GATE_KEY}.{adapter_name}.{key}"] = tensor
        return out

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # nested containers: o3_lora.<adapter>.lora_A.weight and o3_gate.<adapter>.<request>.<field>
        for container in (GATE_KEY, "o3_lora"):
            marker = f"{container}.{adapter_name}."
            if key.startswith(marker) or f".{marker}" in key:
                return key.replace(marker, f"{container}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        gate, rest = {}, {}
        for key, tensor in state_dict.items():
            head, sep, tail = key.partition(f"{GATE_KEY}.")
            if sep and (head == "" or head.endswith(".")):
                gate[tail] = tensor
            else:
                rest[key] = tensor
        if gate:
            base = getattr(model, "base_model", None)
            if not isinstance(base, O3Model):
                raise ValueError("an O3 adapter with a gate can only be loaded into a PeftModel (O3Model)")
            base.o3_gate_state.load_tensors(adapter_name, config, gate)
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=rest
        )


# The gate and the nested o3_lora keys need the hooks above: with older PEFT, save and load raise.
require_tuner_state_dict_hooks(O3Model)
