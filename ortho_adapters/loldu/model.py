"""LoLDU tuner model (PEFT ``BaseTuner``)."""

from __future__ import annotations

from ..core.model import OrthoTuner
from .layer import LoLDULayer


class LoLDUModel(OrthoTuner):
    """Injects :class:`LoLDULayer` into the targeted linear layers. Use through ``get_peft_model``."""

    prefix = "loldu_"
    tuner_layer_cls = LoLDULayer
    layer_cls = LoLDULayer
