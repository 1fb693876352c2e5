"""How the data-driven passes (LoRA-SB's gradient init, the continual lifecycle) feed a batch to a model.

A mapping batch (a ``dict`` or transformers' ``BatchEncoding``) is passed as ``model(**batch)``, anything
else as ``model(batch)``; tensors are moved to the model's device first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (also inside a mapping) moved to ``device``; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(batch)`` otherwise."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)
