"""A client's local training: ``steps`` SGD steps on its own data, optionally DP-SGD through Opacus."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .privacy import ClientPrivacy, dp_train_steps


def local_train(
    model: nn.Module,
    dataset: Dataset,
    steps: int,
    batch_size: int,
    lr: float,
    loss_fn: Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor],
    seed: int,
    privacy: Optional[ClientPrivacy] = None,
    momentum: float = 0.0,
) -> list[float]:
    """Train the model's trainable tensors for ``steps`` optimizer steps; return the per-step losses.

    Plain SGD (the optimizer is created per round, so no state crosses rounds). Without ``privacy``: shuffled
    batches of ``batch_size``. With ``privacy``: Opacus DP-SGD (Poisson batches of expected size
    ``batch_size``, per-sample clipping, Gaussian noise), accounted into ``privacy``. ``seed`` fixes the data
    order / Poisson draws, the noise and (through the global RNG, which is reseeded) the dropout masks:
    reproducible experiments, not Opacus' secure mode.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    model.train()
    if privacy is not None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
        return dp_train_steps(model, optimizer, loader, privacy, steps, loss_fn, noise_generator=generator)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)
    losses: list[float] = []
    while len(losses) < steps:
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if len(losses) == steps:
                break
    return losses
