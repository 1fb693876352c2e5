"""LoRA-SB (arXiv 2411.19557): frozen B, A; trainable r x r R; gradient-derived initialization."""

from ..registry import register
from .config import LoraSBConfig
from .init import initialize_lora_sb
from .layer import LoraSBLayer
from .model import LoraSBModel

register("LORA_SB", LoraSBConfig, LoraSBModel)

__all__ = ["LoraSBConfig", "LoraSBLayer", "LoraSBModel", "initialize_lora_sb"]
