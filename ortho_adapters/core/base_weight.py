"""Reading and writing a tuner layer's base weight as an fp32 ``(out, in)`` matrix.

Plain ``nn.Linear``, transformers' ``Conv1D`` (stored ``(in, out)``) and bitsandbytes 8/4-bit layers
(through PEFT's quantization backends) all look the same to the methods. Under DeepSpeed ZeRO-3 a weight
partitioned at load (``zero3_init_flag``) is gathered for the read, as PEFT does for its data-derived
LoRA inits, so that SVD / LU inits see the full matrix. A 4-bit weight that bitsandbytes repacked for
its CPU inference kernel is restored first (see :mod:`.cpu_4bit`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import gather_params_ctx
from torch import nn

from .compat import quantization_backend, set_base_weight
from .cpu_4bit import restore_4bit_layout
from .zero3 import gathered


def base_weight_of(base: nn.Module) -> torch.Tensor:
    """The weight of a plain or quantized base layer as stored (dequantized; a CPU-packed 4-bit weight is
    restored first, since it dequantizes to garbage). Under ZeRO-3 read it via :func:`whole_base_weight`."""
    restore_4bit_layout(base)
    backend = quantization_backend(base)
    return backend.get_base_weight(base) if backend is not None else base.weight.data


@contextmanager
def whole_base_weight(base: nn.Module) -> Iterator[torch.Tensor]:
    """:func:`base_weight_of` ``base`` for the block, a ZeRO-3 partitioned weight gathered meanwhile (every
    process must enter it). No-ops without ZeRO-3: PEFT's gather where transformers knows the DeepSpeed
    config, ours where it does not (``torchrun`` + ``deepspeed.initialize``)."""
    with gather_params_ctx(base.weight, modifier_rank=None), gathered([base.weight]):
        yield base_weight_of(base)


def read_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """Return a fresh fp32 ``(out_features, in_features)`` copy of the (dequantized) base weight."""
    with whole_base_weight(layer.get_base_layer()) as weight:
        if layer.fan_in_fan_out:
            weight = weight.t()
        return weight.detach().to(torch.float32, copy=True)


def write_weight(layer: BaseTunerLayer, weight: torch.Tensor) -> None:
    """Store an fp32 ``(out, in)`` matrix as the base weight in the base's dtype (re-quantizing if needed)."""
    base = layer.get_base_layer()
    if layer.quantization_backend is None:
        dtype = base.weight.dtype
    else:  # bitsandbytes quantizes from a float tensor in its compute dtype
        dtype = getattr(base, "compute_dtype", None) or torch.float16
    if layer.fan_in_fan_out:
        weight = weight.t()
    set_base_weight(layer, weight.to(dtype).contiguous())
