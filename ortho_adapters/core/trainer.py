"""A ``transformers.Trainer`` that adds a method's regularizer to the training loss (O-LoRA, O3)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer


class PenaltyTrainer(Trainer):
    """``loss = task loss + penalty(model)``; subclasses implement :meth:`penalty` (None adds nothing)."""

    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        """The regularizer for ``model`` (as the ``Trainer`` calls it, possibly wrapped), or ``None``."""
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, **kwargs: Any):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        extra = self.penalty(model)
        if extra is not None:
            loss = loss + extra.to(device=loss.device, dtype=loss.dtype)
        return (loss, outputs) if return_outputs else loss
