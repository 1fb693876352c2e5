"""DeepSpeed ZeRO-3 partitioned parameters: finding them and gathering them for a read or a write.

Under ZeRO-3 a parameter outside its module's forward is an empty partition (``param.data`` has shape
``(0,)``; DeepSpeed keeps the full shape in ``param.ds_shape``). These helpers gather such parameters with
``deepspeed.zero.GatheredParameters`` whenever one is partitioned: they look at the parameters themselves,
so they also work when transformers does not know about the DeepSpeed config (``torchrun`` +
``deepspeed.initialize``) and are no-ops (deepspeed is never imported) for every other parameter.

A gather is a collective: every process must enter it, with the same parameters in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn


def is_zero3_param(t: torch.Tensor) -> bool:
    """Whether ``t`` is a parameter DeepSpeed ZeRO-3 manages (partitioned or currently gathered)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_numel")


def is_partitioned(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ZeRO-3 parameter that holds only its (empty) partition right now."""
    return is_zero3_param(t) and t.numel() != t.ds_numel


@contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None) -> Iterator[bool]:
    """Inside, every partitioned parameter of ``params`` holds its full tensor; afterwards it is partitioned
    again (``modifier_rank=k``: what process ``k`` wrote inside is broadcast first, so all processes keep it).

    Parameters that are not partitioned (plain tensors, or ZeRO-3 parameters that DeepSpeed holds gathered
    at the moment) are left alone, so nothing DeepSpeed gathered for a running forward is released here.
    Yields whether anything was gathered.
    """
    todo = [p for p in params if is_partitioned(p)]
    if not todo:
        yield False
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(todo, modifier_rank=modifier_rank):
        yield True


def has_zero3_hooks(model: nn.Module) -> bool:
    """Whether DeepSpeed registered its ZeRO-3 forward hooks on ``model`` (``deepspeed.initialize``
    ran), which gather each module's parameters for its forward and backward."""
    return any(hasattr(m, "ds_inflight_param_registry") for m in model.modules())


@contextmanager
def whole_for_plain_forward(model: nn.Module) -> Iterator[None]:
    """Gather every partitioned parameter of ``model`` when no DeepSpeed engine manages it yet (weights
    partitioned at load with ``zero.Init``, before ``deepspeed.initialize``): a plain forward / backward then
    sees full weights (each process holds the whole model meanwhile). A no-op otherwise."""
    params = [p for p in model.parameters() if is_partitioned(p)]
    if not params or has_zero3_hooks(model):
        yield
        return
    with gathered(params):
        yield


@torch.no_grad()
def write_parameter(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` that also holds under DeepSpeed, before and after ``deepspeed.initialize``.

    A ZeRO-3 partition is gathered for the write (process 0's value is kept by every process), and where a
    ZeRO optimizer keeps an fp32 master copy of ``param`` (stages 1-3, after ``deepspeed.initialize``) that
    copy is written too: otherwise the next optimizer step would start from the old value. Every process must
    call it (ZeRO-3), with the same ``value``.
    """
    with gathered([param], modifier_rank=0):
        param.copy_(value.to(param.device, param.dtype))
    if hasattr(param, "_z3_optimizer") or getattr(param, "_hp_mapping", None) is not None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.to(param.device, torch.float32))


def gather_saved_entries(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace, in place, each entry of ``state_dict`` (``model.state_dict()`` of a PEFT model) that is an
    empty ZeRO-3 partition of a parameter PEFT saves with the full tensor (a copy, gathered; every process
    must call it). Saved: the tuner layers' parameters (``"base_layer"`` not in the name), trainable ones
    and those of ``modules_to_save`` / trainable-token wrappers; frozen base weights stay partitioned.
    """
    wanted = []
    for name, param in model.named_parameters():
        if name not in state_dict or not is_partitioned(param) or state_dict[name].numel() == param.ds_numel:
            continue
        if param.requires_grad or "base_layer" not in name:
            wanted.append((name, param))
    saved_by_peft = [(n, p) for n, p in wanted if _saved_by_peft(model, n, p)]
    if not saved_by_peft:
        return
    with gathered([p for _, p in saved_by_peft]):
        for name, param in saved_by_peft:
            state_dict[name] = param.detach().clone()


def _saved_by_peft(model: nn.Module, name: str, param: torch.Tensor) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if param.requires_grad or "modules_to_save" in name or "trainable_tokens" in name:
        return True
    owner = name.rsplit(".", 1)[0]
    while owner:  # a frozen tensor of an adapter (inside a tuner layer, outside its base layer)
        module = model.get_submodule(owner)
        if isinstance(module, BaseTunerLayer):
            return True
        owner = owner.rsplit(".", 1)[0] if "." in owner else ""
    return False


def check_no_partitions(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise when an entry of ``state_dict`` is still the empty partition of a ZeRO-3 parameter."""
    params = dict(model.named_parameters())
    empty = sorted(
        key
        for key, value in state_dict.items()
        if key in params
        and is_zero3_param(params[key])
        and isinstance(value, torch.Tensor)
        and value.numel() != params[key].ds_numel
    )
    if empty:
        raise RuntimeError(
            f"{len(empty)} adapter tensor(s) to be saved are empty DeepSpeed ZeRO-3 partitions, e.g. "
            f"'{empty[0]}'. Call save_pretrained on every process (is_main_process= picks the writer), or "
            "pass state_dict=accelerator.get_state_dict(model) (also gathered on every process)."
        )
