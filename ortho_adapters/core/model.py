"""The ``BaseTuner`` every ortho_adapters method's model class derives from."""

from __future__ import annotations

from typing import Any, ClassVar

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import OrthoAdapterConfig
from .layer import OrthoLayer, is_supported_base


class OrthoTuner(BaseTuner):
    """Injects ``layer_cls`` into each targeted linear layer (PEFT's LoRA defaults for ``target_modules``)."""

    layer_cls: ClassVar[type[OrthoLayer]]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: OrthoAdapterConfig, adapter_name: str) -> None:
        """Validate every target before any module is replaced, so a bad config leaves the model untouched."""
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        for name, module in model.named_modules():
            if not self._check_target_module_exists(config, name):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not is_supported_base(base):
                raise ValueError(self._unsupported(name, base))
            out_features, in_features = _get_in_out_features(base)[::-1]
            r = self.layer_cls.resolve_rank(config, out_features, in_features)
            self.layer_cls.check_rank(r, out_features, in_features, name)

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
