"""O3 unlearning (arXiv 2407.10223): one orthogonal LoRA per unlearning request behind an OOD gate.

``unlearn(model, forget_data, name=...)`` handles one request end to end; the gate (detector LoRA, statistics,
calibration) is saved with the adapter and reloaded by ``PeftModel.from_pretrained`` after
``import ortho_adapters``.
"""

from ..registry import register
from .config import O3Config
from .layer import O3Layer
from .model import O3Model
from .penalty import orthogonality_penalty

register("O3", O3Config, O3Model)

from .unlearn import O3Trainer, unlearn  # noqa: E402  (needs the registration above)

__all__ = ["O3Config", "O3Layer", "O3Model", "O3Trainer", "orthogonality_penalty", "unlearn"]
