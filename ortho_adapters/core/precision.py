"""Autocast in custom autograd functions.

``torch.autocast`` is active inside ``autograd.Function.forward`` but not in ``backward``, which then
meets bf16 saved activations and fp32 frozen factors ("expected m1 and m2 to have the same dtype").
``torch.amp.custom_fwd`` / ``custom_bwd`` fix that for one device type fixed at decoration time; these
helpers do the same for whatever device the input lives on: record the autocast state in forward and
re-enter it in backward, so every matmul of the backward runs in the forward's autocast dtype.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

import torch


def autocast_state(x: torch.Tensor) -> Optional[tuple[str, torch.dtype]]:
    """``(device_type, dtype)`` of the autocast region ``x``'s device is in, or ``None``."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def reenter_autocast(state: Optional[tuple[str, torch.dtype]]) -> AbstractContextManager[Any]:
    """Context manager that restores a state from :func:`autocast_state` (no-op for ``None``)."""
    if state is None:
        return nullcontext()
    device_type, dtype = state
    return torch.autocast(device_type, dtype=dtype)


def compute_dtype(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype if autocast is on, else ``default``."""
    state = autocast_state(x)
    return default if state is None else state[1]
