"""When the fused Triton kernels may be used: CUDA, Triton importable, a supported dtype, not disabled."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

# Setting this environment variable to anything but "", "0" or "false" turns the fused kernels off.
DISABLE_ENV = "ORTHO_ADAPTERS_DISABLE_KERNELS"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest rank the kernels keep in registers (the rank is padded to a power of two >= 16).
MAX_RANK = 128


def kernels_disabled() -> bool:
    """True when ``ORTHO_ADAPTERS_DISABLE_KERNELS`` is set to a true value (read at every call)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package is installed (``pip install ortho_adapters[kernels]``)."""
    return importlib.util.find_spec("triton") is not None


def kernels_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernels run for tensors of ``dtype`` on ``device``.

    True only on a CUDA device, with Triton installed, for fp32 / bf16 / fp16, and unless
    ``ORTHO_ADAPTERS_DISABLE_KERNELS`` is set. (Under ``TRITON_INTERPRET=1`` the kernels also run on CPU
    tensors, which is how they are tested, but the layers never dispatch to them there.)
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype not in SUPPORTED_DTYPES:
        return False
    return not kernels_disabled() and triton_importable() and torch.cuda.is_available()
