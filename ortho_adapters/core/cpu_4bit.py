"""Guard against bitsandbytes' CPU inference repacking of 4-bit weights (bitsandbytes 0.49-0.50).

On a CPU with AVX512-BF16, ``bnb.nn.Linear4bit.forward`` in eval mode with an input that does not require
grad repacks its weight in place for a fast inference kernel (``quant_state.packing_format_for_cpu``):
the 4-bit codes are reordered, the block scales (``absmax``) become a transposed bf16 matrix and a nested
(double-quantized) state is flattened. From then on ``matmul_4bit`` calls ``gemv_4bit``, which has no
autograd (training gets zero gradient through the layer, silently), and the weight no longer dequantizes
to the true matrix. bitsandbytes' own inverse (used only when saving) restores the codes exactly but not
the scales: it leaves them transposed in bf16 (wrong whenever ``in_features`` exceeds the block size) or
re-quantizes them.

So the tuner layers :func:`remember_4bit_state` (a shallow copy of the quantization state, a few bytes
per block) while the weight is in the usual layout, and :func:`restore_4bit_layout` puts back the exact
codes with that state before any read of the base weight and before a forward that needs gradients.
Inference keeps the fast kernel. A weight that was packed before an adapter wrapped it has no remembered
state: its scales are then restored from the bf16 copy (relative error up to 2**-8), with a warning.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

_STATE = "_ortho_adapters_unpacked_quant_state"


def is_cpu_packed(base: nn.Module) -> bool:
    """Whether ``base``'s 4-bit weight is in bitsandbytes' CPU inference layout."""
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def remember_4bit_state(base: nn.Module) -> None:
    """Keep a copy of ``base``'s quantization state while its weight is in the usual layout (no-op else).

    bitsandbytes' packing rebinds the state's fields (it never writes into their tensors), so a shallow
    copy keeps the original scales alive.
    """
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if state is not None and not getattr(state, "packing_format_for_cpu", False):
        setattr(base, _STATE, copy.copy(state))


def _scales_from_packed(state) -> None:
    """Best-effort: the usual-layout scales from the packed bf16 ``(in / block, out)`` matrix, in place."""
    if getattr(state, "original_nested", False):
        from bitsandbytes.functional import quantize_blockwise

        absmax = state.absmax.T.reshape(-1).to(torch.float32)
        state.offset = absmax.mean()
        state.absmax, state.state2 = quantize_blockwise(absmax - state.offset, blocksize=256)
        state.nested = True
    else:
        state.absmax = state.absmax.T.contiguous().reshape(-1).to(torch.float32)
    state.dtype = state.original_dtype
    state.packing_format_for_cpu = False


def restore_4bit_layout(base: nn.Module) -> bool:
    """Undo the CPU inference packing of ``base``'s weight in place; return whether it was packed.

    The 4-bit codes are recovered exactly; the quantization state is the remembered one (exact) or, if none
    was remembered, rebuilt from the packed bf16 scales (see the module docstring).
    """
    if not is_cpu_packed(base):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = base.weight
    packed_state = weight.quant_state
    codes, _ = _convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(packed_state))
    remembered = getattr(base, _STATE, None)
    if remembered is not None and tuple(remembered.shape) == tuple(packed_state.shape):
        state = copy.copy(remembered)
    else:
        warnings.warn(
            "a 4-bit weight was repacked by bitsandbytes' CPU inference kernel (an eval-mode forward) "
            "before an ortho_adapters adapter wrapped it; its block scales are restored from that kernel's "
            "bf16 copy (relative error up to 2**-8). Attach adapters before the first eval forward to keep "
            "them exact.",
            stacklevel=3,
        )
        state = copy.copy(packed_state)
        _scales_from_packed(state)
    weight.data, weight.quant_state = codes, state
    if getattr(base, "quant_state", None) is not None:  # the module mirrors it in some versions
        base.quant_state = state
    setattr(base, _STATE, copy.copy(state))
    return True
