"""Conformance battery: every registered method x an MLP, a tiny Llama and a GPT-2 (Conv1D) model.

References are independent of the method's own code paths: the base model's own outputs, PEFT's
disable/merge machinery, a fresh interpreter for reloads, exact parameter counts from the paper's
definition (``conformance_cases.METHOD_CASES``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conformance_cases import METHOD_CASES
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import MODEL_CASES, logits, tiny_lm_trainer
from torch import nn

from ortho_adapters.core import OrthoLayer
from ortho_adapters.core.compat import needs

TESTS = Path(__file__).parent
METHODS = sorted(METHOD_CASES)
MODELS = sorted(MODEL_CASES)
grid = pytest.mark.parametrize("method,model_name", [(m, n) for m in METHODS for n in MODELS])


def build(method: str, model_name: str, adapter_name: str = "default", **overrides):
    case = MODEL_CASES[model_name]
    config = METHOD_CASES[method].make_config(case.targets, **overrides)
    return get_peft_model(case.model(), config, adapter_name=adapter_name), case


def perturb(model: nn.Module, seed: int = 3, scale: float = 0.3) -> None:
    """Move every trainable adapter tensor away from its initial value (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def adapted_layers(model: nn.Module) -> list[OrthoLayer]:
    return [m for m in model.modules() if isinstance(m, OrthoLayer)]


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


@grid
def test_trainable_parameter_count(method, model_name):
    model, _ = build(method, model_name)
    shapes = [(layer.out_features, layer.in_features) for layer in adapted_layers(model)]
    assert shapes, "no layer adapted"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.peft_config["default"]
    assert trainable == METHOD_CASES[method].trainable(shapes, config)


@grid
def test_starts_at_base(method, model_name):
    if not METHOD_CASES[method].starts_at_base:
        pytest.skip("method does not promise an exact base start")
    case = MODEL_CASES[model_name]
    base = case.model()
    with torch.no_grad():
        expected = logits(base, case.inputs())
    model, _ = build(method, model_name)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, case.inputs()), expected, rtol=0, atol=1e-6)


@grid
def test_one_step_changes_adapter_only(method, model_name):
    model, case = build(method, model_name)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**case.labelled())
    loss = out["loss"] if isinstance(out, dict) else out.loss
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    prefix = model.base_model.prefix
    assert all(prefix in n for n in trainable)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, buffers[name]), f"frozen buffer {name} changed"


@pytest.fixture(scope="module", params=METHODS)
def reloaded(request, tmp_path_factory):
    """Save one perturbed adapter per model case, reload all in one fresh interpreter."""
    method = request.param
    if method == "o3" and needs("o3-save"):
        pytest.skip(needs("o3-save"))  # test_o3_save_and_load_raise_without_peft_hooks covers it there
    tmp = tmp_path_factory.mktemp(method)
    expected, pairs = {}, []
    for name in MODELS:
        model, case = build(method, name)
        perturb(model)
        model.eval()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the child: a thread count can change a GEMM's summation order
        try:
            with torch.no_grad():
                expected[name] = logits(model, case.inputs())
        finally:
            torch.set_num_threads(threads)
        model.save_pretrained(tmp / name)
        pairs.append(f"{name}={tmp / name}")
    out = tmp / "reloaded.safetensors"
    proc = subprocess.run(
        [sys.executable, str(TESTS / "reload_check.py"), str(out), *pairs],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return method, expected, load_file(out), tmp


def test_reload_in_fresh_process_is_identical(reloaded):
    method, expected, got, tmp = reloaded
    for name in MODELS:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
        assert (tmp / name / "adapter_model.safetensors").exists()
        assert not list((tmp / name).glob("*.bin")), "only safetensors may be written"


@pytest.mark.skipif(needs("o3-save") is None, reason="this peft saves O3 (the reload test checks it)")
def test_o3_save_and_load_raise_without_peft_hooks(tmp_path):
    """Where PEFT does not call the tuner's state-dict hooks, O3 must refuse to save or load (it would
    otherwise reload as the base model), and nothing is written."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model, _ = build("o3", "llama")
    with pytest.raises(RuntimeError, match="needs peft >= 0.21"):
        model.save_pretrained(tmp_path / "o3")
    assert not list((tmp_path / "o3").glob("*.safetensors"))
    with pytest.raises(RuntimeError, match="needs peft >= 0.21"):
        get_peft_model_state_dict(model)
    with pytest.raises(RuntimeError, match="needs peft >= 0.21"):
        set_peft_model_state_dict(model, {})


@grid
def test_merge_and_unload_matches_unmerged(method, model_name):
    model, case = build(method, model_name)
    perturb(model)
    model.eval()
    with torch.no_grad():
        expected = logits(model, case.inputs())
        merged = model.merge_and_unload()
        assert not adapted_layers(merged)
        torch.testing.assert_close(logits(merged, case.inputs()), expected, rtol=1e-4, atol=1e-5)


@grid
def test_unmerge_restores_base_weights(method, model_name):
    model, case = build(method, model_name)
    perturb(model)
    before = base_weights(model)
    model.merge_adapter(safe_merge=True)
    after_merge = base_weights(model)
    assert any(not torch.equal(before[n], after_merge[n]) for n in before)
    model.unmerge_adapter()
    for name, weight in base_weights(model).items():
        torch.testing.assert_close(weight, before[name], rtol=0, atol=1e-5)


@grid
def test_disable_adapter_gives_base_logits(method, model_name):
    case = MODEL_CASES[model_name]
    with torch.no_grad():
        expected = logits(case.model(), case.inputs())
    model, _ = build(method, model_name)
    perturb(model)
    with torch.no_grad():
        assert not torch.allclose(logits(model, case.inputs()), expected)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, case.inputs()), expected, rtol=0, atol=1e-6)


@grid
def test_second_adapter_add_set_delete(method, model_name):
    model, case = build(method, model_name)
    perturb(model, seed=3)
    with torch.no_grad():
        first = logits(model, case.inputs())
    config = copy.deepcopy(model.peft_config["default"])
    model.add_adapter("second", config)
    model.set_adapter("second")
    perturb(model, seed=4)
    with torch.no_grad():
        second = logits(model, case.inputs())
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)
    model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(logits(model, case.inputs()), first, rtol=0, atol=0)
    model.delete_adapter("second")
    assert all("second" not in n for n, _ in model.named_parameters())
    assert all("second" not in n for n, _ in model.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(logits(model, case.inputs()), first, rtol=0, atol=0)


@grid
def test_bf16_base_forward_is_finite_with_fp32_adapter(method, model_name):
    case = MODEL_CASES[model_name]
    model = get_peft_model(case.model().to(torch.bfloat16), METHOD_CASES[method].make_config(case.targets))
    perturb(model)
    adapter_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert adapter_dtypes == {torch.float32}
    batch = case.inputs()
    if "x" in batch:
        batch = {"x": batch["x"].to(torch.bfloat16)}
    with torch.no_grad():
        out = logits(model, batch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _quantize_mlp_layer(linear: nn.Linear, bits: int) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    weight, n_in, n_out = linear.weight.data.clone(), linear.in_features, linear.out_features
    if bits == 4:
        q = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(n_in, n_out, bias=True, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_bnb_quantized_base_on_cpu(method, bits):
    case = MODEL_CASES["mlp"]
    base = case.model()
    base.lin0 = _quantize_mlp_layer(base.lin0, bits)
    base.lin1 = _quantize_mlp_layer(base.lin1, bits)
    with torch.no_grad():
        expected = logits(base, case.inputs())
    model = get_peft_model(base, METHOD_CASES[method].make_config(case.targets))
    if METHOD_CASES[method].starts_at_base:
        with torch.no_grad():
            torch.testing.assert_close(logits(model, case.inputs()), expected, rtol=0, atol=1e-5)
    model.train()
    out = model(**case.labelled())
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    perturb(model)
    with torch.no_grad():
        unmerged = logits(model, case.inputs())
        merged = model.merge_and_unload()
        # merging re-quantizes: equal up to the quantization error of the merged weight
        torch.testing.assert_close(logits(merged, case.inputs()), unmerged, rtol=0.1, atol=0.15)


@pytest.mark.parametrize("method", METHODS)
def test_trainer_loss_falls(method, tmp_path):
    case = MODEL_CASES["llama"]
    model = get_peft_model(
        case.model(),
        METHOD_CASES[method].make_config(case.targets + ("o_proj", "gate_proj", "up_proj", "down_proj")),
    )
    trainer = tiny_lm_trainer(model, str(tmp_path), METHOD_CASES[method].trainer_lr, steps=12, batch_size=8)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses


@pytest.mark.parametrize("method", METHODS)
def test_bad_configs_raise_value_error(method):
    case = MODEL_CASES["mlp"]
    make = METHOD_CASES[method].make_config
    with pytest.raises(ValueError, match="r"):
        make(case.targets, r=0)
    with pytest.raises(ValueError, match="too large for layer 'lin0'"):
        get_peft_model(case.model(), make(case.targets, r=11))
    with pytest.raises(ValueError, match="not found|match"):
        get_peft_model(case.model(), make(("no_such_module",)))
    # the second target fails (head: out=2): the first must not have been replaced either
    base = case.model()
    with torch.no_grad():
        expected = logits(base, case.inputs())
    with pytest.raises(ValueError, match="too large for layer 'head'"):
        get_peft_model(base, make(("lin1", "head"), r=4))
    assert not adapted_layers(base) and not hasattr(base, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(logits(base, case.inputs()), expected, rtol=0, atol=0)
