"""Machinery shared by every ortho_adapters method."""

from .autograd import FrozenFactorProduct, frozen_factor_product
from .base_weight import read_weight, write_weight
from .config import OrthoAdapterConfig
from .finite import NonFiniteError, all_finite, check_base_weight, check_finite
from .layer import COMMON_NAMES, OrthoLayer, is_supported_base
from .leaf import DiagonalScale, FrozenFactorLeaf, MixingMatrix
from .model import OrthoTuner
from .svd import randomized_svd, truncated_svd, truncated_svds

__all__ = [
    "COMMON_NAMES",
    "DiagonalScale",
    "FrozenFactorProduct",
    "FrozenFactorLeaf",
    "MixingMatrix",
    "NonFiniteError",
    "OrthoAdapterConfig",
    "OrthoLayer",
    "OrthoTuner",
    "all_finite",
    "check_base_weight",
    "check_finite",
    "frozen_factor_product",
    "is_supported_base",
    "randomized_svd",
    "read_weight",
    "truncated_svd",
    "truncated_svds",
    "write_weight",
]
