"""ZeRO-3 partitions without DeepSpeed's processes: a stand-in ``deepspeed.zero.GatheredParameters``.

A "partitioned" parameter carries ``ds_id`` / ``ds_numel`` and holds an empty tensor outside a gather, as
under DeepSpeed ZeRO-3 outside its module's forward; inside a gather it holds the full tensor. The real
2-process runs are in ``test_deepspeed_zero3.py`` (slow); these check, in one process and fast, what each
fix does: ``save_pretrained`` writes gathered tensors, HUT's forward (both paths, with backward) reads a
gathered base weight, LoRA-SB's gradient init runs on a model partitioned at load and writes ``R``
through a gather.
"""

from __future__ import annotations

import itertools
import sys
import types
from contextlib import contextmanager

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import MLP

import ortho_adapters
from ortho_adapters.hut.layer import HUTLayer
from ortho_adapters.lora_sb.layer import LoraSBLayer


class FakeZero3:
    def __init__(self) -> None:
        self.full: dict[int, torch.Tensor] = {}
        self.ids = itertools.count()
        self.gathers: list[tuple[int, ...]] = []

    def partition(self, params) -> None:
        for p in params:
            self.full[id(p)] = p.data
            p.ds_id, p.ds_numel = next(self.ids), p.numel()
            p.data = torch.empty(0, dtype=p.dtype)

    @contextmanager
    def gathered_parameters(self, params, modifier_rank=None, fwd_module=None):
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        params = [p for p in params if hasattr(p, "ds_id")]
        self.gathers.append(tuple(p.ds_id for p in params))
        for p in params:
            p.data = self.full[id(p)]
        try:
            yield
        finally:
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype)


@pytest.fixture
def zero3(monkeypatch) -> FakeZero3:
    fake = FakeZero3()
    deepspeed = types.ModuleType("deepspeed")
    deepspeed.zero = types.SimpleNamespace(GatheredParameters=fake.gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    return fake


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(seed))
    return {"x": x, "labels": (x[:, 0] > 0).long()}


def _pair(config):
    """The same seeded PEFT model twice: one to partition, one plain reference."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        base = MLP()
        torch.manual_seed(1)
        models.append(get_peft_model(base, config()))
    return models


def test_save_pretrained_gathers_partitioned_adapter_tensors(zero3, tmp_path):
    part, plain = _pair(
        lambda: ortho_adapters.HUTConfig(r=2, target_modules=["lin0", "lin1"], init_weights=False)
    )
    zero3.partition(list(part.parameters()))  # every tensor, base weights and adapter factors
    part.save_pretrained(str(tmp_path))
    assert all(p.numel() == 0 for p in part.parameters()), "saving must leave the partitions as they were"
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(MLP(), str(tmp_path))
    batch = _batch()
    torch.testing.assert_close(reloaded(**batch)["logits"], plain(**batch)["logits"], rtol=0, atol=0)
    gathered = {i for ids in zero3.gathers for i in ids}
    base_ids = {p.ds_id for n, p in part.named_parameters() if "hut_" not in n}
    assert gathered and not gathered & base_ids, "only the adapter's tensors are gathered for the save"


def test_save_pretrained_refuses_a_partition_it_cannot_gather(zero3, tmp_path, monkeypatch):
    part, _ = _pair(lambda: ortho_adapters.LoraSBConfig(r=2, target_modules=["lin0", "lin1"]))
    zero3.partition([p for p in part.parameters() if p.requires_grad])
    monkeypatch.setattr("ortho_adapters.core.model.gather_saved_entries", lambda model, state_dict: None)
    with pytest.raises(RuntimeError, match="empty DeepSpeed ZeRO-3 partitions"):
        part.save_pretrained(str(tmp_path))


@pytest.mark.parametrize("execution", ["materialize", "factored"])
def test_hut_reads_a_gathered_base_weight(zero3, execution):
    part, plain = _pair(
        lambda: ortho_adapters.HUTConfig(
            r=2, target_modules=["lin0", "lin1"], init_weights=False, execution=execution
        )
    )
    bases = [m.get_base_layer() for m in part.modules() if isinstance(m, HUTLayer)]
    for base in bases:  # partitioned; the base layer's own forward gathers them, as DeepSpeed's hooks do
        zero3.partition([base.weight, base.bias])

        def gather_for_forward(module, args, kwargs, output=None, _base=base):
            ctx = zero3.gathered_parameters([_base.weight, _base.bias])
            ctx.__enter__()
            _base._ctx = ctx

        def release(module, args, output, _base=base):
            _base._ctx.__exit__(None, None, None)

        base.register_forward_pre_hook(gather_for_forward, with_kwargs=True)
        base.register_forward_hook(release)
    batch = _batch()
    with torch.no_grad():  # e.g. generate(), outside DeepSpeed's engine
        torch.testing.assert_close(part(**batch)["logits"], plain(**batch)["logits"], rtol=0, atol=1e-6)
    if execution == "materialize":  # the base layer's forward is not called: its backward needs no gather
        for model in (part, plain):
            model(**batch)["loss"].backward()
        grads = {n: p.grad for n, p in part.named_parameters() if p.requires_grad}
        for name, param in plain.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=1e-6, msg=name)
    assert all(b.weight.numel() == 0 for b in bases)


def test_lora_sb_gradient_init_on_a_model_partitioned_at_load(zero3):
    config = lambda: ortho_adapters.LoraSBConfig(r=2, target_modules=["lin0", "lin1"], init="gradient")  # noqa: E731
    with pytest.warns(UserWarning, match="no gradient factors yet"):
        part, plain = _pair(config)
    zero3.partition(list(part.parameters()))  # base weights and R (as after deepspeed.initialize)
    loader = [_batch(2), _batch(3)]
    for model in (part, plain):
        ortho_adapters.initialize_lora_sb(model, loader, step_size=0.05, num_samples=None, progress=False)
    assert all(p.numel() == 0 for p in part.parameters()), "the partitions must be restored"
    layers = {n: m for n, m in part.named_modules() if isinstance(m, LoraSBLayer)}
    for name, ref in plain.named_modules():
        if name in layers:
            for buf in ("lora_sb_A", "lora_sb_B"):
                torch.testing.assert_close(
                    getattr(layers[name], buf)["default"], getattr(ref, buf)["default"]
                )
            r = layers[name].lora_sb_R["default"].weight
            torch.testing.assert_close(zero3.full[id(r)], ref.lora_sb_R["default"].weight, msg=name)
