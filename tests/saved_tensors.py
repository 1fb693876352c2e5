"""Counting what autograd keeps for backward (the activation-memory checks of the frozen-factor layers)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def owned_storages(*modules: nn.Module) -> set[int]:
    """Storage pointers of every parameter and buffer: saved tensors that are weights, not activations."""
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


def saved_activation_values(fn: Callable[[], object], owned: set[int]) -> int:
    """Number of values autograd saves for backward while running ``fn``, excluding ``owned`` storages."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        if t.untyped_storage().data_ptr() not in owned:
            count += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count
