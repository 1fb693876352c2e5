"""Orthogonal continual LoRA tuner model (PEFT ``BaseTuner``)."""

from __future__ import annotations

from ..core.model import OrthoTuner
from .layer import OrthoLoraLayer


class OrthoLoraModel(OrthoTuner):
    """Injects :class:`OrthoLoraLayer` into the targeted linear layers. Use through ``get_peft_model``."""

    prefix = "ortho_lora_"
    tuner_layer_cls = OrthoLoraLayer
    layer_cls = OrthoLoraLayer
