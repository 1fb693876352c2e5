"""HUT beyond the conformance battery: both execution paths vs a dense reference, "auto", dtypes, merging."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from saved_tensors import owned_storages, saved_activation_values
from torch import nn
from transformers.pytorch_utils import Conv1D

import ortho_adapters
from ortho_adapters.hut import HUTLayer, choose_path, path_costs
from ortho_adapters.hut.layer import UNMERGE_GUARD

N_IN, N_OUT, R = 12, 10, 3


def _model(base: nn.Module, **kw):
    config = ortho_adapters.HUTConfig(target_modules=["0"], **{"r": R, "alpha": 6.0, **kw})
    return get_peft_model(nn.Sequential(base), config)


def _layer(model) -> HUTLayer:
    return next(m for m in model.modules() if isinstance(m, HUTLayer))


def _randomize(layer: HUTLayer, name: str = "default", seed: int = 0, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    leaf = layer.hut_factors[name]
    with torch.no_grad():
        leaf.B.copy_(torch.randn(leaf.B.shape, generator=g) * scale)
        leaf.A.copy_(torch.randn(leaf.A.shape, generator=g) * scale)


def _base_weight(base: nn.Module) -> torch.Tensor:
    """(out, in) fp32 copy of the base weight, read independently of the package."""
    w = base.weight.detach().float()
    return w.t().clone() if isinstance(base, Conv1D) else w.clone()


def _reference(x, w0, bias, b, a, s):
    """Dense ``x (W0 ⊙ (1 + s B A))^T + bias`` with plain autograd, fp32."""
    out = x @ (w0 * (1 + s * b @ a)).t()
    return out if bias is None else out + bias


def _bases(dtype=torch.float32) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(N_IN, N_OUT).to(dtype),
        "linear_nobias": nn.Linear(N_IN, N_OUT, bias=False).to(dtype),
        "conv1d": Conv1D(N_OUT, N_IN).to(dtype),
    }


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1d"])
@pytest.mark.parametrize("execution", ["materialize", "factored"])
def test_paths_match_dense_reference_outputs_and_gradients(kind, execution):
    base = _bases()[kind]
    model = _model(base, execution=execution)
    layer = _layer(model)
    _randomize(layer)
    leaf, s = layer.hut_factors["default"], layer.scaling["default"]
    assert s == 2.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, N_IN, generator=g, requires_grad=True)
    out = model(x)
    b = leaf.B.detach().clone().requires_grad_(True)
    a = leaf.A.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias = None if base.bias is None else base.bias.detach()
    ref = _reference(x_ref, _base_weight(base), bias, b, a, s)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (x, leaf.B, leaf.A), gy)
    want = torch.autograd.grad(ref, (x_ref, b, a), gy)
    for name, g_got, g_want in zip("xBA", got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("execution", ["materialize", "factored"])
def test_exact_base_start(kind, execution):
    base = _bases()[kind]
    x = torch.randn(4, N_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = base(x)
    model = _model(base, execution=execution)
    assert torch.equal(_layer(model).hut_factors["default"].B, torch.zeros(N_OUT, R))
    with torch.no_grad():
        got = model(x)
    # Linear: the very same F.linear call (bitwise); Conv1D's addmm may order the sums differently
    atol = 0.0 if kind == "linear" else 1e-6
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_auto_picks_cheaper_path_as_documented():
    m = n = 64
    r = 8
    # the documented break-even points at r = 8: inference factored only at T = 1, training only at T <= 2
    inference = [choose_path(path_costs(t, m, n, r, False, False)) for t in (1, 2, 3)]
    training = [choose_path(path_costs(t, m, n, r, True, True)) for t in (1, 2, 3, 512)]
    assert inference == ["factored", "materialize", "materialize"]
    assert training == ["factored", "factored", "materialize", "materialize"]
    costs = path_costs(4096, 1024, 1024, 8, True, True)
    assert costs["materialize"] == 3 * 4096 * 1024 * 1024 + 35 * 1024 * 1024
    # the layer follows the rule for its own shape, rank and gradient needs
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(n, m)), ortho_adapters.HUTConfig(r=r, target_modules=["0"])
    )
    layer = _layer(model)
    paths = []
    layer.hut_factors["default"].register_forward_pre_hook(lambda mod, args: paths.append(args[4]))
    for tokens, grad in [(1, False), (2, False), (2, True), (3, True), (40, True)]:
        x = torch.randn(tokens, n, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            model(x)
            chosen = layer.execution_path("default", x)
        want = choose_path(path_costs(tokens, m, n, r, grad, grad))
        assert chosen == want
        assert paths[-1] == ("fused" if want == "materialize" else "factored")


def test_materialize_saves_input_not_the_merged_weight():
    torch.manual_seed(0)
    model = _model(nn.Linear(48, 40), execution="materialize")
    layer = _layer(model)
    x = torch.randn(7, 48, requires_grad=True)
    saved = saved_activation_values(lambda: model(x), owned_storages(model))
    assert layer.hut_execution["default"] == "materialize"
    assert saved == x.numel()  # no (out x in) W' kept per layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("execution", ["materialize", "factored"])
def test_bf16_base(kind, execution):
    base = _bases(torch.bfloat16)[kind]
    model = _model(base, execution=execution)
    layer = _layer(model)
    _randomize(layer, scale=0.3)
    leaf, s = layer.hut_factors["default"], layer.scaling["default"]
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    x = torch.randn(6, N_IN, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    b = leaf.B.detach().clone().requires_grad_(True)
    a = leaf.A.detach().clone().requires_grad_(True)
    ref = _reference(x.float(), _base_weight(base), base.bias.detach().float(), b, a, s)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, (leaf.B, leaf.A), gy.to(out.dtype))
    want = torch.autograd.grad(ref, (b, a), gy)
    for g_got, g_want in zip(got, want):
        assert g_got.dtype == torch.float32
        torch.testing.assert_close(g_got, g_want, rtol=5e-2, atol=5e-2)


def test_dropout_paths_agree_and_only_touch_the_update():
    torch.manual_seed(0)
    base = nn.Linear(N_IN, N_OUT)
    outs = {}
    for execution in ("materialize", "factored"):
        model = _model(base, execution=execution, dropout=0.5)
        _randomize(_layer(model))
        model.train()
        x = torch.randn(5, N_IN, generator=torch.Generator().manual_seed(5))
        torch.manual_seed(7)
        outs[execution] = model(x)
        model.eval()
        with torch.no_grad():
            eval_out = model(x)
        leaf = _layer(model).hut_factors["default"]
        ref = _reference(x, _base_weight(base), base.bias.detach(), leaf.B.detach(), leaf.A.detach(), 2.0)
        torch.testing.assert_close(eval_out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["materialize"], outs["factored"], rtol=1e-5, atol=1e-5)


def test_merge_unmerge_round_trip_with_vanishing_multiplier_entries():
    torch.manual_seed(0)
    base = nn.Linear(N_IN, N_OUT)
    model = _model(base)
    layer = _layer(model)
    _randomize(layer)
    leaf = layer.hut_factors["default"]
    with torch.no_grad():  # make M[0, :] exactly zero and M[1, 2] tiny: W there cannot be divided back out
        leaf.B[0] = 0.0
        leaf.B[0, 0] = -1.0 / layer.scaling["default"]
        leaf.A[0] = 1.0
        leaf.B[1] = 0.0
        leaf.B[1, 0] = (-1.0 + 1e-5) / layer.scaling["default"]
    multiplier = 1 + layer.scaling["default"] * leaf.B.detach() @ leaf.A.detach()
    assert (multiplier.abs() < UNMERGE_GUARD).sum() >= N_IN + 1
    before = base.weight.detach().clone()
    x = torch.randn(3, N_IN)
    with torch.no_grad():
        unmerged_out = model(x)
        model.merge_adapter()
        torch.testing.assert_close(base.weight, before * multiplier, rtol=0, atol=0)
        torch.testing.assert_close(model(x), unmerged_out, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    torch.testing.assert_close(base.weight, before, rtol=1e-6, atol=1e-7)
    assert torch.equal(base.weight[0], before[0]) and base.weight[1, 2] == before[1, 2]
    # without a record of the lost entries, unmerging must refuse rather than return garbage
    with pytest.raises(ValueError, match="Cannot unmerge HUT adapter"):
        layer.unmerged_weight("default", base.weight.detach().float())


def test_two_active_adapters_multiply_like_sequential_merges():
    torch.manual_seed(0)
    base = nn.Linear(N_IN, N_OUT)
    model = _model(base)
    model.add_adapter("second", ortho_adapters.HUTConfig(r=2, target_modules=["0"]))
    layer = _layer(model)
    _randomize(layer, "default", seed=1)
    _randomize(layer, "second", seed=2)
    layer.set_adapter(["default", "second"])
    x = torch.randn(4, N_IN)
    m1, m2 = (layer._multiplier(n) for n in ("default", "second"))
    ref = x @ (_base_weight(base) * m1 * m2).t() + base.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
