"""HUT tuner model (PEFT ``BaseTuner``)."""

from __future__ import annotations

from ..core.model import OrthoTuner
from .layer import HUTLayer


class HUTModel(OrthoTuner):
    """Injects :class:`HUTLayer` into the targeted linear layers. Use through ``get_peft_model``."""

    prefix = "hut_"
    tuner_layer_cls = HUTLayer
    layer_cls = HUTLayer
