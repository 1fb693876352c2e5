"""FedSVD tuner model (PEFT ``BaseTuner``)."""

from __future__ import annotations

from ..core.model import OrthoTuner
from .layer import FedSVDLayer


class FedSVDModel(OrthoTuner):
    """Injects :class:`FedSVDLayer` into the targeted linear layers. Use through ``get_peft_model``."""

    prefix = "fedsvd_"
    tuner_layer_cls = FedSVDLayer
    layer_cls = FedSVDLayer
