"""LoRA-SB tuner model (PEFT ``BaseTuner``)."""

from __future__ import annotations

from ..core.model import OrthoTuner
from .layer import LoraSBLayer


class LoraSBModel(OrthoTuner):
    """Injects :class:`LoraSBLayer` into the targeted linear layers. Use through ``get_peft_model``."""

    prefix = "lora_sb_"
    tuner_layer_cls = LoraSBLayer
    layer_cls = LoraSBLayer
