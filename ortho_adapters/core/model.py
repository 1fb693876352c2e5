"""The ``BaseTuner`` every ortho_adapters method's model class derives from."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, ClassVar, Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .compat import in_out_features, require_tuner_state_dict_hooks
from .config import OrthoAdapterConfig
from .finite import check_base_weight
from .layer import OrthoLayer, is_supported_base
from .zero3 import check_no_partitions, gather_saved_entries, is_zero3_param


class OrthoTuner(BaseTuner):
    """Injects ``layer_cls`` into each targeted linear layer (PEFT's LoRA defaults for ``target_modules``)."""

    layer_cls: ClassVar[type[OrthoLayer]]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _targets(
        self,
        model: nn.Module,
        config: OrthoAdapterConfig,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` of every module ``inject_adapter`` will adapt, found as PEFT finds them.

        Works on a copy of ``config`` (``all-linear`` expanded); modules inside existing tuner layers are
        skipped, and with ``state_dict`` the targets are the modules its keys name.
        """
        config = self._prepare_adapter_config(copy.copy(config), self.get_model_config(model))
        config = _maybe_include_all_linear_layers(config, model)
        named = [(name, module) for name, module in model.named_modules() if name]
        inside = tuple(name + "." for name, module in named if isinstance(module, BaseTunerLayer))
        from_state = None
        if state_dict is not None:
            from_state = {k.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for k in state_dict}
        for name, module in named:
            if name.startswith(inside):
                continue
            if from_state is not None:
                if name.removeprefix("_orig_mod.") in from_state:
                    yield name, module
            elif self._check_target_module_exists(config, name):
                yield name, module

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
        **kwargs: Any,
    ) -> None:
        """PEFT's ``inject_adapter``, after checking the base weight of every target for NaN / Inf when the
        method's init reads it (:meth:`OrthoLayer.base_weight_step`): a non-finite base weight raises
        :class:`~ortho_adapters.core.finite.NonFiniteError` before any module is replaced."""
        step = self.layer_cls.base_weight_step(self.peft_config[adapter_name])
        if step is not None:
            for name, module in self._targets(model, self.peft_config[adapter_name], state_dict):
                if is_supported_base(
                    module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
                ):
                    check_base_weight(module, step=step, layer=name)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
            **kwargs,
        )

    def _pre_injection_hook(self, model: nn.Module, config: OrthoAdapterConfig, adapter_name: str) -> None:
        """Validate every target before any module is replaced, so a bad config leaves the model untouched."""
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        for name, module in model.named_modules():
            if not self._check_target_module_exists(config, name):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not is_supported_base(base):
                raise ValueError(self._unsupported(name, base))
            out_features, in_features = in_out_features(base)[::-1]
            r = self.layer_cls.resolve_rank(config, out_features, in_features)
            self.layer_cls.check_rank(r, out_features, in_features, name)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: OrthoAdapterConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """PEFT's selection of the adapter's entries (``save_pretrained``, ``get_peft_model_state_dict``),
        with every DeepSpeed ZeRO-3 partition among them gathered first (:func:`.zero3.gather_saved_entries`),
        so that the full adapter is saved and never an empty ``(0,)`` tensor. Under ZeRO-3 every process
        must call ``save_pretrained`` (``is_main_process=`` picks the writer): the gather is a collective.
        """
        gather_saved_entries(model, state_dict)
        out = super()._get_adapter_state_dict(
            model=model,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        check_no_partitions(model, out)
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's ``delete_adapter``, with each layer's ``adapter_dropout`` entry removed first: peft < 0.20
        lists the module names before deleting and skips only names with the method's prefix, so it would
        look up the deleted, prefix-less ``adapter_dropout.<name>`` and fail (the entry holds no tensors)."""
        if adapter_name in self.peft_config:
            for module in self.model.modules():
                if isinstance(module, OrthoLayer) and adapter_name in module.adapter_dropout:
                    del module.adapter_dropout[adapter_name]
        super().delete_adapter(adapter_name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's convention: adapters in fp32 (``True``, how they are created) or in the base layer's dtype.

        Adapters are created in fp32 so that data-derived factors (SVD, LU) never pass through bf16; with
        ``autocast_adapter_dtype=False`` each layer's copy is cast to its base layer's compute dtype.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if isinstance(module, OrthoLayer) and adapter_name in module.trainable_modules:
                dtype = module.compute_dtype()
                if dtype.is_floating_point:
                    module.cast_adapter(adapter_name, dtype)

    def _unsupported(self, name: str, base: nn.Module) -> str:
        return (
            f"Target module '{name}' is a {type(base).__name__}; {type(self).__name__} supports only "
            "torch.nn.Linear, transformers' Conv1D and bitsandbytes 8/4-bit linear layers"
        )

    def _create_and_replace(
        self,
        config: OrthoAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, self.layer_cls):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not is_supported_base(base):
            raise ValueError(self._unsupported(current_key, base))
        new_module = self.layer_cls(target, adapter_name, config, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def _zero3_save_needs_hooks(model: nn.Module) -> Optional[str]:
    """Under ZeRO-3 the adapter is gathered for saving in ``_get_adapter_state_dict`` (peft >= 0.21)."""
    if any(is_zero3_param(p) for p in model.parameters()):
        return "DeepSpeed ZeRO-3 partitions would be saved empty (no gather)"
    return None


require_tuner_state_dict_hooks(OrthoTuner, when=_zero3_save_needs_hooks)
