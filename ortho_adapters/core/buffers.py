"""A ``BufferDict`` whose entries are saved or not per adapter.

Frozen factors that are a deterministic function of the base weight (LoLDU's LU factors) need not be in
the adapter file: they can be rebuilt at load. PEFT's ``BufferDict`` fixes persistence per container and
re-registers an entry whenever it is re-assigned (device moves, dtype casts), so the choice is kept per key.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict


class FactorDict(BufferDict):
    """Per-adapter frozen tensors; :meth:`put` decides whether an adapter's entry is saved."""

    def __init__(self) -> None:
        super().__init__(persistent=True)
        self.transient: set[str] = set()

    def put(self, key: str, tensor: torch.Tensor, persistent: bool) -> None:
        """Store ``tensor`` under ``key``, in the state dict only if ``persistent``."""
        if persistent:
            self.transient.discard(key)
        else:
            self.transient.add(key)
        self[key] = tensor

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        self.register_buffer(key, buffer, persistent=key not in self.transient)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.transient.discard(key)
        self._non_persistent_buffers_set.discard(key)
