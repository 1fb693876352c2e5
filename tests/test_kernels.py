"""Fused-kernel dispatch (CPU, no GPU needed) and the interpreted kernel tests (in a subprocess).

The dispatch tests pretend the kernels are available (``kernels_available`` monkeypatched) and replace the
fused function by a recorder that evaluates the same formula with PyTorch ops: a layer that dispatches must
give the PyTorch path's output and gradients (so ``frozen_factors`` hands over the right factors), and
every documented fallback condition must keep the PyTorch path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tiny_models import UpDown, tiny_gpt2
from torch import nn

import ortho_adapters
from ortho_adapters.core.autograd import frozen_factor_product
from ortho_adapters.kernels import availability, dispatch, kernels_available

HERE = Path(__file__).parent


TARGETS = ["up", "down"]
CONFIGS = {
    "lora_sb": lambda **kw: ortho_adapters.LoraSBConfig(target_modules=TARGETS, r=4, init="svd", **kw),
    "loldu": lambda **kw: ortho_adapters.LoLDUConfig(target_modules=TARGETS, r=8, **kw),
    "fedsvd": lambda **kw: ortho_adapters.FedSVDConfig(target_modules=TARGETS, r=4, **kw),
}


@pytest.fixture
def fake_kernels(monkeypatch):
    """Kernels 'available' everywhere; the fused call evaluated with PyTorch ops and recorded."""
    calls: list[torch.dtype] = []
    dtypes: list[torch.dtype] = []

    def available(device, dtype):
        dtypes.append(dtype)
        return True

    def fused(x, weight, bias, a, m, b, scaling):
        calls.append(x.dtype)
        return F.linear(x, weight, bias) + frozen_factor_product(x, a, m, b, scaling)

    monkeypatch.setattr(dispatch, "kernels_available", available)
    monkeypatch.setattr(dispatch, "fused_frozen_factor_linear", fused)
    return calls, dtypes


def _model(method: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(UpDown(), CONFIGS[method](init_weights=False, **kw))


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))


def _step(model, x):
    model.zero_grad()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_dispatch_hands_over_the_right_factors(method, fake_kernels, monkeypatch):
    calls, _ = fake_kernels
    model = _model(method)
    y_fused, g_fused = _step(model, _x())
    assert len(calls) == 2  # both adapted layers
    monkeypatch.setenv(availability.DISABLE_ENV, "1")
    monkeypatch.setattr(dispatch, "kernels_available", kernels_available)  # the real one: env var wins
    y_ref, g_ref = _step(model, _x())
    assert len(calls) == 2
    torch.testing.assert_close(y_fused, y_ref)
    assert g_fused.keys() == g_ref.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], msg=name)


def test_dispatch_conv1d_base(fake_kernels):
    """GPT-2's Conv1D stores (in, out): the fused call gets the (out, in) view and the same output."""
    calls, _ = fake_kernels
    torch.manual_seed(0)
    config = ortho_adapters.FedSVDConfig(target_modules=["c_attn"], r=4, init_weights=False)
    model = get_peft_model(tiny_gpt2(), config).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    fused = model(input_ids=ids).logits
    assert len(calls) == 2
    with dispatch_off():
        ref = model(input_ids=ids).logits
    torch.testing.assert_close(fused, ref)


class dispatch_off:
    """Context manager: ``ORTHO_ADAPTERS_DISABLE_KERNELS=1`` with the real ``kernels_available``."""

    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv(availability.DISABLE_ENV, "1")
        self.mp.setattr(dispatch, "kernels_available", kernels_available)

    def __exit__(self, *exc):
        self.mp.undo()


def test_autocast_asks_for_the_autocast_dtype(fake_kernels):
    calls, dtypes = fake_kernels
    model = _model("lora_sb")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(_x())
    assert dtypes[-1] == torch.bfloat16 and calls and y.dtype == torch.bfloat16


def _fallback_cases():
    def use_kernels_false():
        return _model("lora_sb", use_kernels=False), None

    def dropout_training():
        return _model("loldu", dropout=0.1).train(), None

    def two_active_adapters():
        model = _model("fedsvd")
        model.add_adapter("other", CONFIGS["fedsvd"](init_weights=False))
        model.base_model.set_adapter(["default", "other"])
        return model, None

    def merged():
        model = _model("fedsvd")
        model.merge_adapter()
        return model, None

    def disabled():
        model = _model("lora_sb")
        return model, model.disable_adapter()

    def hook_on_base():
        model = _model("lora_sb")
        for module in model.modules():
            if isinstance(module, nn.Linear) and not isinstance(module, ortho_adapters.core.OrthoLayer):
                module.register_forward_hook(lambda *args: None)
        return model, None

    def trainable_base_weight():
        model = _model("fedsvd")
        for name, p in model.named_parameters():
            if name.endswith("base_layer.weight"):
                p.requires_grad_(True)
        return model, None

    def hut_has_no_frozen_factors():
        torch.manual_seed(0)
        return get_peft_model(UpDown(), ortho_adapters.HUTConfig(target_modules=TARGETS, r=4)), None

    return [
        use_kernels_false,
        dropout_training,
        two_active_adapters,
        merged,
        disabled,
        hook_on_base,
        trainable_base_weight,
        hut_has_no_frozen_factors,
    ]


@pytest.mark.parametrize("case", _fallback_cases(), ids=lambda f: f.__name__)
def test_dispatch_falls_back_to_pytorch(case, fake_kernels):
    calls, _ = fake_kernels
    model, context = case()
    if context is None:
        model(_x())
    else:
        with context:
            model(_x())
    assert calls == []


def test_dropout_in_eval_mode_still_dispatches(fake_kernels):
    calls, _ = fake_kernels
    _model("loldu", dropout=0.1).eval()(_x())
    assert len(calls) == 2


def test_kernels_available_rules(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv(availability.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(availability, "triton_importable", lambda: True)
    assert kernels_available(cuda, torch.bfloat16)
    assert kernels_available(cuda, torch.float16) and kernels_available(cuda, torch.float32)
    assert not kernels_available(cuda, torch.float64)
    assert not kernels_available(torch.device("cpu"), torch.float32)
    monkeypatch.setenv(availability.DISABLE_ENV, "1")
    assert not kernels_available(cuda, torch.bfloat16)
    monkeypatch.setenv(availability.DISABLE_ENV, "0")
    assert kernels_available(cuda, torch.bfloat16)
    monkeypatch.setattr(availability, "triton_importable", lambda: False)
    assert not kernels_available(cuda, torch.bfloat16)


def test_use_kernels_config_round_trip(tmp_path):
    model = _model("lora_sb", use_kernels=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_kernels"] is False
    loaded = PeftModel.from_pretrained(UpDown(), tmp_path)
    layer = loaded.base_model.model.up
    assert layer.use_kernels == {"default": False}
    # a config saved before the field existed loads with the default (True)
    del saved["use_kernels"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    assert PeftModel.from_pretrained(UpDown(), tmp_path).base_model.model.up.use_kernels == {"default": True}
    with pytest.raises(ValueError, match="use_kernels"):
        ortho_adapters.LoraSBConfig(target_modules=TARGETS, use_kernels="yes")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (kernels extra)")
def test_kernels_under_triton_interpreter():
    """``tests/kernels_interpreted.py`` in a process started with ``TRITON_INTERPRET=1``: all must pass."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE / "kernels_interpreted.py"),
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "failed" not in summary, tail


def _compile_sm90(fn, values: dict, consts: dict, **options):
    """Compile ``fn`` for sm_90 (ptxas ships in the triton wheel, no GPU needed), specialized as the JIT
    would for these argument values: ints equal to 1 become constants, multiples of 16 and pointers get
    16-divisibility. Returns ``(shared memory bytes, async copies in the TTGIR)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    sig, attrs, constexprs = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        value = values.get(name)
        if name in consts:
            sig[name] = "constexpr"
        elif isinstance(value, str):
            sig[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            sig[name], constexprs[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return kernel.metadata.shared, kernel.asm["ttgir"].count("async_copy_global_to_local")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (kernels extra)")
def test_kernels_compile_for_h100(monkeypatch):
    """Every kernel compiles for sm_90 at d=4096, T=8192, r=64, bf16, with a pipelined K loop (async
    copies) and shared memory within an H100's 227 KB. A compile check only: nothing runs."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    tk = importlib.import_module("ortho_adapters.kernels.triton_kernels")
    if tk.INTERPRETED:
        pytest.skip("kernel module was imported under TRITON_INTERPRET=1")
    t, d, r, p = 8192, 4096, 64, "*bf16"
    common = dict(R_PAD=r, PREC="tf32", EMULATE=False)
    gemm = dict(x_ptr=p, w_ptr=p, bias_ptr=p, v_ptr=p, bf_ptr=p, c_ptr=p, M=t, N=d, K=d, r=r)
    gemm |= dict(stride_xm=d, stride_xk=1, stride_vm=r, stride_vr=1, stride_cm=d, stride_cn=1)
    forward = gemm | dict(stride_wn=d, stride_wk=1, stride_bn=r, stride_br=1)
    backward = gemm | dict(stride_wn=1, stride_wk=d, stride_bn=1, stride_br=d)  # W^T, A^T views
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    checks = {
        "forward GEMM": (tk._mm_lowrank_kernel, forward, dict(HAS_BIAS=True, HAS_LOWRANK=True, **cfg)),
        "dx GEMM": (tk._mm_lowrank_kernel, backward, dict(HAS_BIAS=False, HAS_LOWRANK=True, **cfg)),
    }
    lowrank_in = dict(x_ptr=p, a_ptr=p, m_ptr=p, u_ptr=p, v_ptr=p, T=t, K=d, r=r, scaling=0.5)
    lowrank_in |= dict(stride_xt=d, stride_xk=1, stride_ar=d, stride_ak=1, stride_m0=r, stride_m1=1)
    lowrank_in |= dict(stride_ut=r, stride_ur=1, stride_vt=r, stride_vr=1)
    checks["u pass"] = (tk._lowrank_in_kernel, lowrank_in, dict(MIX=2, BLOCK_T=64, BLOCK_K=64))
    dy = dict(dy_ptr=p, b_ptr=p, u_ptr=p, m_ptr=p, du_ptr=p, db_ptr="*fp32", dm_ptr="*fp32", T=t, N=d, r=r)
    dy |= dict(scaling=0.5, stride_dyt=d, stride_dyn=1, stride_bn=r, stride_br=1, stride_ut=r, stride_ur=1)
    dy |= dict(stride_m0=r, stride_m1=1, stride_dut=r, stride_dur=1)
    for mix, need_b, need_m in ((2, False, True), (0, True, False)):
        flags = dict(MIX=mix, NEED_B=need_b, NEED_M=need_m, NEED_U=True, BLOCK_T=64, BLOCK_N=64)
        checks[f"dy pass MIX={mix}"] = (tk._dy_pass_kernel, dy, flags)
    for label, (fn, values, consts) in checks.items():
        shared, copies = _compile_sm90(fn, values, {**common, **consts}, num_warps=4, num_stages=4)
        assert copies > 0 and shared <= 227 * 1024, (label, shared, copies)
