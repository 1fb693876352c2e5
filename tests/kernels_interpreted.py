"""The fused Triton kernels, run on CPU by Triton's interpreter, against the PyTorch reference.

Reference: ``F.linear`` plus :func:`ortho_adapters.core.autograd.frozen_factor_product` (the PyTorch
path the layers run without CUDA), evaluated in float64. In fp32 the kernels must agree with it to
fp32 rounding; in bf16 / fp16 their error must be no larger than the same-dtype PyTorch path's own
error (within a factor 1.5, plus 1e-3 of the largest value). Forward and every gradient (``dx``,
``dbias``, ``dM``, ``dB``), ``M`` an r x r matrix, a vector (diagonal) or None, 2-D and 3-D inputs,
shapes that are no multiple of the block sizes, ranks 1..64.

Triton reads ``TRITON_INTERPRET`` when it is imported (its own ``tl.zeros`` etc. are decorated then) and
while kernels run, so this file needs a process started with it: ``tests/test_kernels.py`` runs it in a
subprocess, or ``TRITON_INTERPRET=1 python -m pytest tests/kernels_interpreted.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("run under TRITON_INTERPRET=1 (tests/test_kernels.py does)", allow_module_level=True)
pytest.importorskip("triton")

from tiny_models import UpDown  # noqa: E402

import ortho_adapters  # noqa: E402
from ortho_adapters.core.autograd import frozen_factor_product  # noqa: E402
from ortho_adapters.kernels import dispatch, fused_frozen_factor_linear  # noqa: E402

# (leading dims of x, in n, out m, rank r, bias)
SHAPES = [
    ((1,), 17, 96, 1, True),
    ((1, 37), 130, 17, 17, False),
    ((2, 65), 96, 130, 64, True),
]
MIXES = ["matrix", "vector", None]


def _operands(lead, n, m_out, r, bias, mix, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    ops = {
        "x": rnd(*lead, n),
        "weight": rnd(m_out, n, scale=n**-0.5),
        "bias": rnd(m_out) if bias else None,
        "a": rnd(r, n, scale=n**-0.5),
        "m": {"matrix": rnd(r, r, scale=r**-0.5), "vector": rnd(r), None: None}[mix],
        "b": rnd(m_out, r, scale=r**-0.5),
    }
    return ops, rnd(*lead, m_out)


def _reference(x, weight, bias, a, m, b, scaling):
    return F.linear(x, weight, bias) + frozen_factor_product(x, a, m, b, scaling)


def _run(fn, ops, grad_y, trainable):
    """Output and gradients of ``fn(**ops)`` w.r.t. the operands named in ``trainable``."""
    leaves = {
        k: (v.detach().clone().requires_grad_(k in trainable) if v is not None else None)
        for k, v in ops.items()
    }
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["a"], leaves["m"], leaves["b"], 0.75)
    y.backward(grad_y.to(y.dtype))
    return y.detach(), {k: leaves[k].grad for k in trainable}


def _errors(ops, grad_y, trainable):
    """Max abs errors (divided by the reference's max abs) of fused and same-dtype PyTorch vs float64."""
    exact = _run(
        _reference,
        {k: v.double() if v is not None else None for k, v in ops.items()},
        grad_y.double(),
        trainable,
    )
    fused = _run(fused_frozen_factor_linear, ops, grad_y, trainable)
    torch_path = _run(_reference, ops, grad_y, trainable)

    def rel(got, ref):
        return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    out = {}
    for name, ref, f, t in [("y", exact[0], fused[0], torch_path[0])] + [
        (k, exact[1][k], fused[1][k], torch_path[1][k]) for k in trainable
    ]:
        assert f.dtype == t.dtype and f.shape == t.shape, name
        out[name] = (rel(f, ref), rel(t, ref))
    return out


ALL = ("x", "bias", "m", "b")


def _trainable(ops, names=ALL):
    return tuple(k for k in names if ops[k] is not None)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-n{s[1]}-m{s[2]}-r{s[3]}-bias{int(s[4])}")
@pytest.mark.parametrize("mix", MIXES, ids=str)
def test_fp32_matches_reference(shape, mix):
    ops, grad_y = _operands(*shape, mix, torch.float32)
    for name, (fused, _) in _errors(ops, grad_y, _trainable(ops)).items():
        assert fused < 2e-6, (name, fused)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-n{s[1]}-m{s[2]}-r{s[3]}-bias{int(s[4])}")
@pytest.mark.parametrize("mix", MIXES, ids=str)
def test_bf16_as_accurate_as_pytorch(shape, mix):
    ops, grad_y = _operands(*shape, mix, torch.bfloat16)
    for name, (fused, torch_path) in _errors(ops, grad_y, _trainable(ops)).items():
        assert fused <= 1.5 * torch_path + 1e-3, (name, fused, torch_path)


def test_fp16_as_accurate_as_pytorch():
    ops, grad_y = _operands((3, 11), 40, 33, 6, True, "matrix", torch.float16)
    for name, (fused, torch_path) in _errors(ops, grad_y, _trainable(ops)).items():
        assert fused <= 1.5 * torch_path + 1e-3, (name, fused, torch_path)


@pytest.mark.parametrize("trainable", [("m",), ("b",), ("x",), ("bias", "b")], ids=lambda t: "+".join(t))
def test_partial_gradients(trainable):
    """Each backward branch alone (frozen ``B`` as in LoRA-SB / LoLDU, ``x`` without grad, ...)."""
    ops, grad_y = _operands((37,), 96, 40, 8, True, "vector", torch.float32)
    for name, (fused, _) in _errors(ops, grad_y, trainable).items():
        assert fused < 2e-6, (name, fused)


def test_autocast_bf16_follows_pytorch_semantics():
    """Under CPU autocast the fused output is bf16 like ``F.linear``'s, gradients land in fp32 tensors."""
    ops, grad_y = _operands((2, 19), 48, 36, 8, True, "matrix", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f, g_f = _run(fused_frozen_factor_linear, ops, grad_y, ALL)
        y_t, g_t = _run(_reference, ops, grad_y, ALL)
    exact_y, exact_g = _run(_reference, {k: v.double() for k, v in ops.items()}, grad_y.double(), ALL)
    assert y_f.dtype == y_t.dtype == torch.bfloat16
    assert all(g_f[k].dtype == torch.float32 for k in ALL)
    scale = exact_y.abs().max()
    assert (y_f.double() - exact_y).abs().max() <= 1.5 * (y_t.double() - exact_y).abs().max() + 1e-3 * scale
    for k in ALL:
        ref = exact_g[k]
        err_f = (g_f[k].double() - ref).abs().max()
        err_t = (g_t[k].double() - ref).abs().max()
        assert err_f <= 1.5 * err_t + 1e-3 * ref.abs().max(), k


def test_saves_only_u_besides_inputs():
    """The autograd graph keeps ``u`` (T x r) and the factors, never an activation of width n or m."""
    ops, _ = _operands((37,), 96, 40, 8, True, "matrix", torch.float32)
    leaves = {k: v.clone().requires_grad_(k in ALL) for k, v in ops.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fused_frozen_factor_linear(
            leaves["x"], leaves["weight"], leaves["bias"], leaves["a"], leaves["m"], leaves["b"], 0.5
        )
    assert (37, 8) in saved
    assert (37, 96) not in saved and (37, 40) not in saved


def test_bad_shapes_raise():
    ops, _ = _operands((5,), 16, 12, 4, True, "matrix", torch.float32)
    with pytest.raises(ValueError, match="b must be"):
        fused_frozen_factor_linear(
            ops["x"], ops["weight"], ops["bias"], ops["a"], ops["m"], ops["b"].t(), 1.0
        )
    with pytest.raises(ValueError, match="m must be"):
        fused_frozen_factor_linear(
            ops["x"], ops["weight"], ops["bias"], ops["a"], ops["m"][:2], ops["b"], 1.0
        )
    with pytest.raises(ValueError, match="frozen"):
        w = ops["weight"].clone().requires_grad_()
        fused_frozen_factor_linear(ops["x"], w, ops["bias"], ops["a"], ops["m"], ops["b"], 1.0)


# ----- the layers, dispatched to the real kernels (interpreted) ------------------------------------------


CONFIGS = {
    "lora_sb": lambda: ortho_adapters.LoraSBConfig(
        target_modules=["up", "down"], r=4, init="svd", init_weights=False
    ),
    "loldu": lambda: ortho_adapters.LoLDUConfig(target_modules=["up", "down"], r=8, init_weights=False),
    "loldu_sigma": lambda: ortho_adapters.LoLDUConfig(
        target_modules=["up", "down"], r=8, train_sigma=True, init_weights=False
    ),
    "fedsvd": lambda: ortho_adapters.FedSVDConfig(target_modules=["up", "down"], r=4, init_weights=False),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_layers_dispatch_to_kernels(method, monkeypatch):
    """With kernels 'available' on CPU the layers run the interpreted kernels: outputs and adapter
    gradients equal the PyTorch path's."""
    torch.manual_seed(0)
    model = get_peft_model(UpDown(), CONFIGS[method]())
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))

    def step():
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    calls = []
    real = dispatch.fused_frozen_factor_linear
    monkeypatch.setattr(dispatch, "fused_frozen_factor_linear", lambda *a: calls.append(1) or real(*a))
    y_ref, g_ref = step()
    assert not calls  # CPU: PyTorch path
    monkeypatch.setattr(dispatch, "kernels_available", lambda device, dtype: True)
    y_fused, g_fused = step()
    assert len(calls) == 2
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-5, atol=1e-5)
    assert g_fused.keys() == g_ref.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)
