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


def broadcast_from_first(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Overwrite each tensor in place with process 0's (a no-op without a group of several ranks), so that
    values every process computed alike are bit-identical everywhere; every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    for t in tensors:
        buffer = t if t.is_contiguous() else t.contiguous()
        dist.broadcast(buffer, src=0)
        if buffer is not t:
            t.copy_(buffer)
    return tensors
