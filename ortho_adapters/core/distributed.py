"""Sums over the processes of a ``torch.distributed`` run (DDP, FSDP, DeepSpeed under ``accelerate``)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over the ranks in place (a no-op without an initialized group of several ranks).

    Keys are reduced in sorted order, so every rank issues the same collectives; every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    for name in sorted(sums):
        dist.all_reduce(sums[name], op=dist.ReduceOp.SUM)
    return sums
