"""Model caching and state conversions used by both apps (one model per process and adapter spec)."""

from __future__ import annotations

import functools

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from ..task import AdapterSpec, attach_adapter, base_model

INITIAL_STATE_ATTR = "_fedsvd_initial_adapter_state"


@functools.lru_cache(maxsize=2)
def cached_model(spec: AdapterSpec) -> nn.Module:
    """The arm's PEFT model (built once per process; its adapter state is overwritten every message).

    The adapter state it was created with is kept (see :func:`initial_state`): a run must start from it, not
    from whatever an earlier run in the same process left in the model.
    """
    model = attach_adapter(base_model(spec.seed), spec)
    setattr(model, INITIAL_STATE_ATTR, adapter_state(model))
    return model


def initial_state(spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """A copy of the adapter state of a freshly built model for ``spec`` (the run's round-0 global state)."""
    return {k: v.clone() for k, v in getattr(cached_model(spec), INITIAL_STATE_ATTR).items()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter state (PEFT's state dict shares storage with the model)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite every adapter tensor of ``model`` with ``state`` (all keys must match)."""
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        raise ValueError(
            f"adapter state keys differ: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    result = set_peft_model_state_dict(model, state)
    unexpected = [k for k in result.unexpected_keys if k in state]
    if unexpected:
        raise ValueError(f"adapter state keys not loaded: {unexpected}")
