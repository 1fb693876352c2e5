"""The plain AdamW loop of the continual benchmarks (``scripts/continual_benchmark.py``,
``scripts/continual_causal_lm.py``): constant lr, no weight decay, a seeded shuffle per epoch."""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm


def train_adamw(
    model: nn.Module,
    examples: Sequence[Any],
    chunk_loss: Callable[[list[Any]], torch.Tensor],
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    penalty: Optional[Callable[[nn.Module], torch.Tensor]] = None,
    desc: str = "",
    disable_progress: bool = False,
) -> list[float]:
    """AdamW over ``examples`` for ``epochs``, minimizing ``chunk_loss(chunk) + penalty(model)``.

    Each epoch shuffles the examples with ``random.Random(seed)`` and cuts them into chunks of ``batch_size``;
    ``torch.manual_seed(seed)`` is set first (dropout). Only the parameters that require grad at the call
    train. The model is left in eval mode. Returns each step's ``chunk_loss`` (the penalty excluded).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    steps = epochs * math.ceil(len(examples) / batch_size)
    losses: list[float] = []
    bar = tqdm(total=steps, desc=desc, leave=False, disable=disable_progress, file=sys.stdout)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            loss = chunk_loss([examples[j] for j in order[i : i + batch_size]])
            total = loss + penalty(model) if penalty is not None else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return losses
