"""Fused Triton kernels for the frozen-factor adapters (LoRA-SB, LoLDU, FedSVD) and their dispatch.

``kernels_available(device, dtype)`` says whether they run; ``fused_frozen_factor_linear`` computes a
layer's full output ``x W^T + bias + s ((x A^T) M^T) B^T``. Triton is imported only when a kernel runs
(``pip install ortho_adapters[kernels]``). The PyTorch path in :mod:`ortho_adapters.core` is their
reference and the default without CUDA; set ``ORTHO_ADAPTERS_DISABLE_KERNELS=1`` or a config's
``use_kernels=False`` to keep it on CUDA too.
"""

from .availability import DISABLE_ENV, MAX_RANK, SUPPORTED_DTYPES, kernels_available
from .function import fused_frozen_factor_linear

__all__ = ["DISABLE_ENV", "MAX_RANK", "SUPPORTED_DTYPES", "fused_frozen_factor_linear", "kernels_available"]
