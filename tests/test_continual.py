"""Orthogonal continual LoRA: the subspace guarantee under AdamW, lifecycle, save / resume, the penalty."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from continual_helpers import base_model, inputs_only, make_model, run_task, task_batches, train_task
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from ortho_adapters.continual import (
    OrthoLoraLayer,
    OrthoLoraTrainer,
    TaskLifecycleError,
    end_task,
    olora_penalty,
    start_task,
)

TESTS = Path(__file__).parent


def layers(model) -> dict[str, OrthoLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OrthoLoraLayer)}


def snapshot(model) -> tuple[dict, dict, str]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, grads, json.dumps(model.peft_config["default"].to_dict(), sort_keys=True, default=str)


def assert_unchanged(model, before) -> None:
    state, grads, config = snapshot(model)
    assert state.keys() == before[0].keys()
    for k, v in state.items():
        assert v.shape == before[0][k].shape and torch.equal(v, before[0][k]), k
    assert grads == before[1]
    assert config == before[2]


def current_delta(layer: OrthoLoraLayer) -> torch.Tensor:
    """``s B_t A_t`` of the current task, computed from the raw tensors."""
    b = layer.ortho_lora_B["default"].weight.detach().double()
    return layer.scaling["default"] * b @ layer.current_a("default").detach().double()


# ----------------------------------------------------------------------------------- (a) subspace guarantee
def test_subspace_update_leaves_earlier_input_bases_untouched_under_adamw():
    model = make_model("subspace")
    run_task(model, "t0", 0, "subspace")
    run_task(model, "t1", 1, "subspace")
    data = task_batches(2)
    start_task(model, "t2", inputs_only(data))
    g = torch.Generator().manual_seed(7)
    probes, before = {}, {}
    for name, layer in layers(model).items():
        m = layer.basis("default")  # union of t0's and t1's bases
        assert m is not None and 0 < m.shape[1] < layer.in_features - layer.r["default"]
        probes[name] = torch.randn(64, m.shape[1], generator=g) @ m.t()  # inputs inside span(M)
        with torch.no_grad():
            before[name] = layer(probes[name]).clone()
    train_task(model, data, steps=40, lr=2e-2)  # AdamW with weight decay
    for name, layer in layers(model).items():
        with torch.no_grad():
            after = layer(probes[name])
        rel = (after - before[name]).norm() / before[name].norm()
        assert rel < 1e-4, (name, float(rel))
        delta = current_delta(layer)
        m = layer.basis("default").double()
        assert delta.norm() > 1e-2, "task t2 did not train: the check would be vacuous"
        share = (delta @ m).norm() / delta.norm()
        assert share < 1e-4, (name, float(share))
    # the tasks were learnt; the basis grows when t2 ends
    dims = {n: layer.basis("default").shape[1] for n, layer in layers(model).items()}
    new_dims = end_task(model, inputs_only(data))
    assert all(new_dims[n] >= dims[n] for n in dims) and any(new_dims[n] > dims[n] for n in dims)


def test_sequential_lora_does_move_the_same_probes():
    """Control for the test above: an ordinary LoRA trained the same way changes those outputs a lot."""
    model = make_model("subspace")
    run_task(model, "t0", 0, "subspace")
    probes = {n: torch.randn(64, layer.basis("default").shape[1]) @ layer.basis("default").t()
              for n, layer in layers(model).items()}  # fmt: skip
    lora = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=32, target_modules=["lin0", "lin1"]))
    train_task(lora, task_batches(0), steps=10)
    mods = dict(lora.named_modules())
    before = {n: mods[n](p).detach() for n, p in probes.items()}
    train_task(lora, task_batches(2), steps=40, lr=2e-2)
    rel = max(float((mods[n](p).detach() - before[n]).norm() / before[n].norm()) for n, p in probes.items())
    assert rel > 1e-2


def test_inference_sums_every_task_and_merge_folds_them_in():
    model = make_model("subspace")
    for t in range(3):
        run_task(model, f"t{t}", t, "subspace")
    x = task_batches(5)[0]["x"]
    with torch.no_grad():
        out = model(x=x)["logits"]
    # independent reference: base weights + s * sum_t B_t A_t, from the raw stacks, applied by hand
    ref_model = base_model()
    with torch.no_grad():
        for name, layer in layers(model).items():
            s, r = layer.scaling["default"], layer.r["default"]
            a_old, b_old = layer.ortho_lora_A_old["default"], layer.ortho_lora_B_old["default"]
            assert a_old.shape[0] == 2 * r  # t0 and t1 frozen, t2 current
            delta = sum(b_old[:, i * r : (i + 1) * r] @ a_old[i * r : (i + 1) * r] for i in range(2))
            delta = delta + layer.ortho_lora_B["default"].weight @ layer.current_a("default")
            getattr(ref_model, name.split(".")[-1]).weight += s * delta
        torch.testing.assert_close(out, ref_model(x=x)["logits"], rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x=x)["logits"], out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- (b) save and resume
@pytest.mark.slow  # a fresh interpreter per mode: ~30 s on the shared 2-core machine
@pytest.mark.parametrize("mode", ["subspace", "olora"])
def test_resume_after_task2_in_fresh_process_gives_identical_weights(mode, tmp_path):
    model = make_model(mode)
    run_task(model, "t1", 1, mode)
    run_task(model, "t2", 2, mode)
    model.save_pretrained(tmp_path / "after_t2")
    saved = json.loads((tmp_path / "after_t2" / "adapter_config.json").read_text())
    assert saved["task_names"] == ["t1", "t2"] and saved["tasks_ended"] == 2
    run_task(model, "t3", 3, mode)  # without a break
    model.save_pretrained(tmp_path / "continuous")
    proc = subprocess.run(
        [sys.executable, str(TESTS / "continual_resume.py"), str(tmp_path / "after_t2"),
         str(tmp_path / "resumed"), mode],
        cwd=TESTS, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = load_file(tmp_path / "continuous" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    assert any("A_old" in k for k in want) and (mode == "olora" or any("_M" in k for k in want))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    config = json.loads((tmp_path / "resumed" / "adapter_config.json").read_text())
    assert config["task_names"] == ["t1", "t2", "t3"] and config["tasks_ended"] == 3


# ----------------------------------------------------------------------------------------- (c) penalty
def test_olora_penalty_matches_numpy_reference():
    model = make_model("olora", l1=0.5, l2=0.1)
    run_task(model, "t0", 0, "olora")
    run_task(model, "t1", 1, "olora")
    start_task(model, "t2")
    train_task(model, task_batches(2), steps=5)  # move A_t, B_t off their init
    # reference: per layer, per earlier task, from the saved per-task blocks, in float64 numpy
    ref = 0.0
    for layer in layers(model).values():
        r = layer.r["default"]
        a_t = layer.ortho_lora_A["default"].weight.detach().double().numpy()
        b_t = layer.ortho_lora_B["default"].weight.detach().double().numpy()
        a_old = layer.ortho_lora_A_old["default"].double().numpy()
        for j in range(a_old.shape[0] // r):
            a_j = a_old[j * r : (j + 1) * r]
            ref += 0.5 * sum(abs(float(np.dot(a_j[i], a_t[k]))) for i in range(r) for k in range(r))
        ref += 0.1 * (np.sqrt((a_t**2).sum()) + np.sqrt((b_t**2).sum()))
    pen = olora_penalty(model)
    assert abs(float(pen.detach()) - ref) < 1e-5 * max(1.0, ref)
    pen.backward()
    assert all(layer.ortho_lora_A["default"].weight.grad is not None for layer in layers(model).values())
    # the penalty pulls A_t towards the complement of the old A's: its l1 term falls when it is minimized
    l1_only = lambda: float(olora_penalty(model, l2=0.0).detach())  # noqa: E731
    first = l1_only()
    opt = torch.optim.SGD([layer.ortho_lora_A["default"].weight for layer in layers(model).values()], lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        olora_penalty(model, l2=0.0).backward()
        opt.step()
    assert l1_only() < 0.5 * first


def test_olora_trainer_adds_the_penalty(tmp_path):
    from transformers import TrainingArguments

    model = make_model("olora")
    run_task(model, "t0", 0, "olora")
    start_task(model, "t1")
    with torch.no_grad():
        for layer in layers(model).values():
            layer.ortho_lora_A["default"].weight.copy_(layer.ortho_lora_A_old["default"][:4] + 0.1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = OrthoLoraTrainer(model=model, args=args)
    batch = task_batches(1)[0]
    model.train()
    loss = trainer.compute_loss(model, batch)
    plain = model(**batch)["loss"]
    assert float(olora_penalty(model).detach()) > 0.1
    torch.testing.assert_close(loss, plain + olora_penalty(model))


def test_subspace_penalty_is_zero():
    model = make_model("subspace")
    run_task(model, "t0", 0, "subspace")
    start_task(model, "t1")
    assert float(olora_penalty(model)) == 0.0


# -------------------------------------------------------------------------------------- (d) lifecycle
def test_out_of_order_calls_raise_and_change_nothing():
    model = make_model("subspace")
    data = inputs_only(task_batches(0))
    before = snapshot(model)
    with pytest.raises(TaskLifecycleError, match="no task is open"):
        end_task(model, data)
    assert_unchanged(model, before)
    start_task(model, "a", data)
    train_task(model, task_batches(0), steps=3)
    before = snapshot(model)
    with pytest.raises(TaskLifecycleError, match="'a' is still open"):
        start_task(model, "b", data)
    with pytest.raises(ValueError, match="needs the finished task's dataloader"):
        end_task(model)
    with pytest.raises(ValueError, match="no batches"):
        end_task(model, [])
    with pytest.raises(RuntimeError):  # a forward that fails midway
        end_task(model, [*data, {"x": torch.randn(2, 5)}])
    assert_unchanged(model, before)
    end_task(model, data)
    before = snapshot(model)
    with pytest.raises(TaskLifecycleError):
        end_task(model, data)
    with pytest.raises(ValueError, match="already exists"):
        start_task(model, "a")
    with pytest.raises(ValueError, match="non-empty string"):
        start_task(model, "")
    assert_unchanged(model, before)


def test_first_task_data_after_training_is_refused():
    model = make_model("subspace")
    train_task(model, task_batches(0), steps=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already non-zero"):
        start_task(model, "a", inputs_only(task_batches(0)))
    assert_unchanged(model, before)
    start_task(model, "a")  # without data the trained first slot is simply named
    assert model.peft_config["default"].task_names == ["a"]


def test_too_small_complement_raises_and_changes_nothing():
    model = make_model("subspace", energy=1.0)  # keep the whole span of the task's inputs
    full = [{"x": torch.randn(256, 32, generator=torch.Generator().manual_seed(0))}]  # spans R^32
    start_task(model, "a")
    train_task(model, task_batches(0), steps=3)
    dims = end_task(model, full)
    assert dims["base_model.model.lin0"] == 32
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'base_model.model.lin0'.* 0 dimensions .*fewer than r=4"):
        start_task(model, "b")
    assert_unchanged(model, before)


def test_lifecycle_on_a_second_adapter_leaves_the_first_alone():
    model = make_model("subspace")
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    model.set_adapter("other")
    run_task(model, "x", 0, "subspace")
    assert model.peft_config["other"].task_names == ["x"]
    assert model.peft_config["default"].task_names == []
    assert all(layer.basis("default") is None for layer in layers(model).values())


# ------------------------------------------------------------------------------ (e) two processes, gloo
@pytest.mark.slow
def test_two_process_end_task_gathers_statistics(tmp_path):
    """``accelerate launch`` with 2 CPU processes, each with different data: both ranks get the same basis,
    and it is the basis a single process computes from both ranks' data together."""
    import os
    import shutil

    exe = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(exe) if exe.exists() else shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(TESTS / "continual_ddp_check.py"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=TESTS, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (load_file(tmp_path / f"rank{k}.safetensors") for k in (0, 1))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs across ranks"
    # single-process reference on the union of both ranks' data
    ref = make_model("subspace")
    start_task(ref, "a", inputs_only(task_batches(0)) + inputs_only(task_batches(1)))
    end_task(ref, inputs_only(task_batches(0)) + inputs_only(task_batches(1)))
    start_task(ref, "b", inputs_only(task_batches(2)) + inputs_only(task_batches(3)))
    local = make_model("subspace")  # rank 0's data alone: a smaller basis, so the check can fail
    start_task(local, "a", inputs_only(task_batches(0)))
    local_dims = end_task(local, inputs_only(task_batches(0)))
    for name, layer in layers(ref).items():
        m, a = r0[f"{name}.M"].double(), r0[f"{name}.A"].double()
        m_ref = layer.basis("default").double()
        assert m.shape == m_ref.shape and local_dims[name] < m.shape[1]
        torch.testing.assert_close(m @ m.t(), m_ref @ m_ref.t(), rtol=0, atol=1e-5)
        a_ref = layer.current_a("default").double()
        torch.testing.assert_close(a.t() @ a, a_ref.t() @ a_ref, rtol=0, atol=1e-5)
