"""HUT (arXiv 2409.13501): ``W' = W0 ⊙ (1 + s B A)``, trainable B (zero init) and A; one-GEMM execution."""

from ..registry import register
from .config import HUTConfig
from .execution import choose_path, factored_update, hadamard_linear, path_costs
from .layer import HadamardFactors, HUTLayer
from .model import HUTModel

register("HUT", HUTConfig, HUTModel)

__all__ = [
    "HUTConfig",
    "HUTLayer",
    "HUTModel",
    "HadamardFactors",
    "choose_path",
    "factored_update",
    "hadamard_linear",
    "path_costs",
]
