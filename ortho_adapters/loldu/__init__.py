"""LoLDU (arXiv 2410.13618): frozen truncated LDU factors of W0, trainable diagonal z (and optional sigma)."""

from ..registry import register
from .config import LoLDUConfig
from .decomposition import fingerprint, ldu_factors, truncated_ldu
from .layer import LoLDULayer
from .model import LoLDUModel

register("LOLDU", LoLDUConfig, LoLDUModel)

__all__ = ["LoLDUConfig", "LoLDULayer", "LoLDUModel", "fingerprint", "ldu_factors", "truncated_ldu"]
