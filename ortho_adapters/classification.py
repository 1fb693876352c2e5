"""Sequence classification on a sentence encoder with masked mean pooling.

MiniLM is a sentence-embedding model whose CLS pooler is weak (shared/ASSETS.md: a linear head on
its frozen CLS pooler reaches 0.675 on Rotten Tomatoes, on mean pooling 0.784), so the head reads the
masked mean of the last hidden states.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .data import mean_pool


class MeanPoolClassifier(nn.Module):
    """``logits = W_c dropout(mean_pool(encoder(x))) + b_c``; cross-entropy loss when ``labels`` are given."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        logits = self.classifier(self.dropout(self.embed(input_ids, attention_mask, **extra)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
