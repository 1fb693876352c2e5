"""ortho_adapters: orthogonal and low-rank adapter methods for Hugging Face PEFT.

``import ortho_adapters`` adds the package's types to ``peft.utils.PeftType`` and registers every
implemented method, so ``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained``
work with the configs below exactly as with PEFT's own methods.
"""

from . import third_party_logs  # noqa: F401  (first: filters two offline warnings before peft imports bnb)
from .continual import OrthoLoraConfig, OrthoLoraModel
from .core.finite import NonFiniteError
from .fedsvd import FedSVDConfig, FedSVDModel
from .hut import HUTConfig, HUTModel
from .loldu import LoLDUConfig, LoLDUModel
from .lora_sb import LoraSBConfig, LoraSBModel, initialize_lora_sb
from .o3 import O3Config, O3Model
from .registry import PEFT_TYPES

__version__ = "0.1.0"

__all__ = [
    "PEFT_TYPES",
    "FedSVDConfig",
    "FedSVDModel",
    "HUTConfig",
    "HUTModel",
    "LoLDUConfig",
    "LoLDUModel",
    "LoraSBConfig",
    "LoraSBModel",
    "NonFiniteError",
    "O3Config",
    "O3Model",
    "OrthoLoraConfig",
    "OrthoLoraModel",
    "__version__",
    "initialize_lora_sb",
]
