"""Data-derived inits under DeepSpeed ZeRO-3: a base weight partitioned at load is gathered for the read.

DeepSpeed is not installed here; a stand-in ``deepspeed.zero.GatheredParameters`` plays ZeRO-3's part:
outside it the weight is an empty partition (as with ``zero3_init_flag``), inside it the full matrix.
LoRA-SB's SVD init and LoLDU's LU must produce exactly the factors they produce on the plain layer.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import pytest
import torch
from peft import get_peft_model
from torch import nn

import ortho_adapters


def _partitioned_model() -> tuple[nn.Module, nn.Module, dict]:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 10))
    full = {id(p): p.detach().clone() for p in plain.parameters()}
    part = nn.Sequential(nn.Linear(12, 10))
    part.load_state_dict(plain.state_dict())
    for p in part.parameters():
        full[id(p)] = p.detach().clone()
        p.data = torch.empty(0)  # what a ZeRO-3 partition looks like outside a gather
    return plain, part, full


@pytest.fixture
def fake_zero3(monkeypatch):
    """``(model, gathered)``: a partitioned model and the list of parameter ids gathered so far."""
    plain, part, full = _partitioned_model()
    gathered: list[int] = []

    @contextmanager
    def gathered_parameters(params, modifier_rank=None, fwd_module=None):
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            gathered.append(id(p))
            p.data = full[id(p)]
        try:
            yield
        finally:
            for p in params:
                p.data = torch.empty(0)

    deepspeed = types.ModuleType("deepspeed")
    deepspeed.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    monkeypatch.setattr("transformers.integrations.is_deepspeed_zero3_enabled", lambda: True)
    return plain, part, gathered


@pytest.mark.parametrize(
    "config, buffers",
    [
        (lambda: ortho_adapters.LoraSBConfig(r=3, target_modules=["0"]), ("lora_sb_A", "lora_sb_B")),
        (lambda: ortho_adapters.LoLDUConfig(r=3, target_modules=["0"]), ("loldu_U", "loldu_PL", "loldu_z0")),
    ],
    ids=["lora_sb", "loldu"],
)
def test_init_reads_the_gathered_full_weight(fake_zero3, monkeypatch, config, buffers):
    plain, part, gathered = fake_zero3
    weight_id = id(part[0].weight)
    adapted = get_peft_model(part, config()).base_model.model[0]
    assert weight_id in gathered, "the base weight was read without a ZeRO-3 gather"
    assert adapted.get_base_layer().weight.numel() == 0, "the weight must stay partitioned afterwards"
    monkeypatch.setattr("transformers.integrations.is_deepspeed_zero3_enabled", lambda: False)
    reference = get_peft_model(plain, config()).base_model.model[0]
    for name in buffers:
        torch.testing.assert_close(getattr(adapted, name)["default"], getattr(reference, name)["default"])
