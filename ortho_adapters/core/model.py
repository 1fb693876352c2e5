"""The ``BaseTuner`` every ortho_adapters method's model class derives from."""

from __future__ import annotations

from typing import Any, ClassVar

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import OrthoAdapterConfig
from .layer import OrthoLayer, is_supported_base


class OrthoTuner(BaseTuner):
    """Injects ``layer_cls`` into each targeted linear layer (PEFT's LoRA defaults for ``target_modules``)."""

    layer_cls: ClassVar[type[OrthoLayer]]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

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
            raise ValueError(
                f"Target module '{current_key}' is a {type(base).__name__}; {type(self).__name__} supports only "
                "torch.nn.Linear, transformers' Conv1D and bitsandbytes 8/4-bit linear layers"
            )
        new_module = self.layer_cls(target, adapter_name, config, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
