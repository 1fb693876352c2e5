"""``OrthoLoraConfig.task_ranks``: a rank per task (more rank for later tasks at the same total budget).

Checked against references computed another way: the per-task factor shapes from the schedule, the model's
output against ``W + (alpha / r) sum_t B_t A_t`` summed by hand over the variable-width blocks, the exact
subspace guarantee under AdamW for a wider later task, and a bit-identical save / load / continue."""

from __future__ import annotations

import pytest
import torch
from continual_helpers import N_IN, base_model, inputs_only, make_model, task_batches, train_task
from peft import PeftModel

from ortho_adapters import OrthoLoraConfig
from ortho_adapters.continual import OrthoLoraLayer, end_task, start_task

SCHEDULE = [2, 3, 5]  # task 0: rank 2, task 1: rank 3, tasks 2, 3, ...: rank 5


def layers(model) -> dict[str, OrthoLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OrthoLoraLayer)}


def run(model, name: str, task: int, mode: str) -> None:
    data = task_batches(task, dim=6)
    start_task(model, name, inputs_only(data) if mode == "subspace" else None)
    train_task(model, data, seed=task)
    end_task(model, inputs_only(data))


@pytest.mark.parametrize("mode", ["subspace", "olora"])
def test_each_task_gets_its_scheduled_rank_and_the_output_sums_the_blocks(mode):
    model = make_model(mode, task_ranks=SCHEDULE, energy=0.9)
    for t in range(3):
        run(model, f"t{t}", t, mode)
    start_task(model, "t3", inputs_only(task_batches(3, dim=6)) if mode == "subspace" else None)
    train_task(model, task_batches(3, dim=6), steps=5)
    ranks = [2, 3, 5, 5]
    x = task_batches(9)[0]["x"]
    ref = base_model()
    for name, layer in layers(model).items():
        a_old, b_old = layer.ortho_lora_A_old["default"], layer.ortho_lora_B_old["default"]
        assert a_old.shape[0] == b_old.shape[1] == sum(ranks[:3])
        assert layer.current_a("default").shape[0] == layer.ortho_lora_B["default"].weight.shape[1] == 5
        assert layer.scaling["default"] == pytest.approx(32 / 4)  # alpha / r for every task (make_model r=4)
        # reference: split the stacks at the schedule's boundaries and add each task's block by hand
        delta, start = layer.ortho_lora_B["default"].weight @ layer.current_a("default"), 0
        for k in ranks[:3]:
            delta = delta + b_old[:, start : start + k] @ a_old[start : start + k]
            start += k
        with torch.no_grad():
            getattr(ref, name.split(".")[-1]).weight += layer.scaling["default"] * delta
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_rank = sum(
        layer.out_features + (layer.in_features if mode == "olora" else 0) for layer in layers(model).values()
    )
    assert trainable == 5 * per_rank
    with torch.no_grad():
        torch.testing.assert_close(model(x=x)["logits"], ref(x=x)["logits"], rtol=1e-5, atol=1e-5)


def test_a_wider_later_task_still_leaves_the_old_bases_untouched_under_adamw():
    model = make_model("subspace", task_ranks=[2, 6], energy=0.9)
    run(model, "t0", 0, "subspace")
    data = task_batches(1, dim=6)
    start_task(model, "t1", inputs_only(data))
    lin0 = layers(model)["base_model.model.lin0"]
    m = lin0.basis("default")
    assert lin0.current_a("default").shape[0] == 6
    probe = torch.randn(64, m.shape[1], generator=torch.Generator().manual_seed(3)) @ m.t()
    with torch.no_grad():
        before = lin0(probe).clone()
    train_task(model, data, steps=40, lr=2e-2)
    with torch.no_grad():
        after = lin0(probe)
    assert lin0.ortho_lora_B["default"].weight.norm() > 1e-2, "the wide task did not train"
    assert (after - before).norm() / before.norm() < 1e-4


def test_save_load_continue_is_bit_identical(tmp_path):
    model = make_model("subspace", task_ranks=SCHEDULE, energy=0.9)
    for t in range(2):
        run(model, f"t{t}", t, "subspace")
    start_task(model, "t2", inputs_only(task_batches(2, dim=6)))
    train_task(model, task_batches(2, dim=6), steps=5)
    model.save_pretrained(tmp_path / "ad")
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "ad", is_trainable=True)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    for mdl in (model, loaded):
        end_task(mdl, inputs_only(task_batches(2, dim=6)))
        start_task(mdl, "t3", inputs_only(task_batches(3, dim=6)))
    for lay, lay2 in zip(layers(model).values(), layers(loaded).values()):
        assert lay2.current_a("default").shape[0] == 5
        torch.testing.assert_close(lay2.current_a("default"), lay.current_a("default"), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "ranks, match",
    [
        ([], "task_ranks"),
        ([4, 0], "task_ranks"),
        ([2.5], "task_ranks"),
        ([True], "task_ranks"),
        (3, "task_ranks"),
    ],
)
def test_bad_schedules_raise(ranks, match):
    with pytest.raises(ValueError, match=match):
        OrthoLoraConfig(target_modules=["lin0"], task_ranks=ranks)


def test_a_scheduled_rank_too_large_for_a_layer_names_it():
    with pytest.raises(ValueError, match=r"r=40 is too large for layer .*lin0"):
        make_model("subspace", task_ranks=[4, 40])
    assert N_IN < 40
