"""LoLDU beyond the conformance battery: the LDU factors, init options, fp32 factorization, memory."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from saved_tensors import owned_storages, saved_activation_values
from tiny_models import MODEL_CASES, logits
from torch import nn

import ortho_adapters
from ortho_adapters.core import frozen_factor_product, read_weight
from ortho_adapters.loldu import LoLDULayer, truncated_ldu
from ortho_adapters.loldu.config import BASE_START_INITS, OFFSET_START_INITS

SHAPES = [(20, 10), (10, 20), (16, 16)]


def _reference_ldu(
    weight: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, PL_r, U_r, d_r)`` from ``torch.linalg.lu`` with the dense permutation matrix."""
    p, lower, upper = torch.linalg.lu(weight)
    d = torch.diagonal(upper)
    return p, p @ lower[:, :r], (upper / d[:, None])[:r], d[:r]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 3, "full"])
def test_truncated_ldu_is_first_r_elimination_steps(shape, rank):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    r = min(shape) if rank == "full" else rank
    pl_r, u_r, d_r = truncated_ldu(weight, r)
    p, ref_pl, ref_u, ref_d = _reference_ldu(weight, r)
    torch.testing.assert_close(pl_r, ref_pl, rtol=0, atol=1e-6)
    torch.testing.assert_close(u_r, ref_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_r, ref_d, rtol=0, atol=0)
    torch.testing.assert_close(torch.diagonal(u_r[:, :r]), torch.ones(r))
    residual = weight - pl_r @ torch.diag(d_r) @ u_r
    assert (p.t() @ residual)[:r].abs().max() < 1e-5  # the r pivot rows are fully eliminated
    assert residual[:, :r].abs().max() < 1e-5  # and so are the first r columns
    if rank == "full":
        torch.testing.assert_close(pl_r @ torch.diag(d_r) @ u_r, weight, rtol=0, atol=1e-5)
    else:
        assert residual.abs().max() > 1e-2


def test_truncated_ldu_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    weight = torch.randn(12, 9, generator=torch.Generator().manual_seed(1))
    p, lower, upper = (torch.from_numpy(t) for t in scipy_linalg.lu(weight.numpy()))
    pl_r, u_r, d_r = truncated_ldu(weight, 5)
    d = torch.diagonal(upper)
    torch.testing.assert_close(pl_r, (p @ lower)[:, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(d_r, d[:5], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u_r, (upper / d[:, None])[:5], rtol=1e-5, atol=1e-5)


def test_zero_pivot_keeps_factors_finite_and_exact():
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    weight[:, 0] = 0.0  # first pivot is zero; its U row is not
    pl_r, u_r, d_r = truncated_ldu(weight, 5)
    assert torch.isfinite(pl_r).all() and torch.isfinite(u_r).all() and d_r[0] == 1.0
    torch.testing.assert_close(pl_r @ torch.diag(d_r) @ u_r, weight, rtol=0, atol=1e-5)


def _mlp_model(init: str, **kw):
    case = MODEL_CASES["mlp"]
    return get_peft_model(
        case.model(), ortho_adapters.LoLDUConfig(r=4, target_modules=list(case.targets), init=init, **kw)
    )


def _layers(model) -> list[LoLDULayer]:
    return [m for m in model.modules() if isinstance(m, LoLDULayer)]


@pytest.mark.parametrize("init", BASE_START_INITS + OFFSET_START_INITS)
def test_init_options_start_at_base_exactly_as_documented(init):
    case = MODEL_CASES["mlp"]
    with torch.no_grad():
        expected = logits(case.model(), case.inputs())
    model = _mlp_model(init)
    for layer in _layers(model):
        z = layer.loldu_z["default"].weight.detach()
        z0, s = layer.loldu_z0["default"], layer.scaling["default"]
        _, pl_r, u_r, d_r = _reference_ldu(read_weight(layer), 4)
        mean = d_r.mean()
        checks = {
            "lu": torch.equal(z, d_r),
            "constant": torch.allclose(z, mean.expand(4)),
            "uniform": bool((z.abs() <= mean.abs() / 2).all()) and z.unique().numel() == 4,
            "normal": z.unique().numel() == 4,
            "s_uniform": bool((z.abs() <= 1).all()) and z.unique().numel() == 4,
            "s_normal": z.unique().numel() == 4,
            "ones": torch.equal(z, torch.ones(4)),
            "zeros": torch.equal(z, torch.zeros(4)),
        }
        assert checks[init], (init, z, d_r)
        offset = z if init in BASE_START_INITS else d_r
        torch.testing.assert_close(z0, offset, rtol=0, atol=1e-6)
        want = s * pl_r @ torch.diag(z - offset) @ u_r
        torch.testing.assert_close(layer.delta_weight("default"), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        got = logits(model, case.inputs())
    if init in BASE_START_INITS:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    else:
        assert (got - expected).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_is_factorized_in_fp32(dtype):
    torch.manual_seed(0)
    base = nn.Linear(24, 16).to(dtype)
    model = get_peft_model(
        nn.Sequential(base), ortho_adapters.LoLDUConfig(r=6, target_modules=["0"], alpha=3.0)
    )
    layer = _layers(model)[0]
    factors = [b for n, b in model.named_buffers() if "loldu_" in n and "fingerprint" not in n]
    assert factors and all(b.dtype == torch.float32 for b in factors)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        layer.loldu_z["default"].weight.add_(torch.linspace(-0.5, 0.5, 6))
    w32 = base.weight.detach().float()  # the exact half-precision values, widened
    _, pl_r, u_r, d_r = _reference_ldu(w32, 6)
    z = layer.loldu_z["default"].weight.detach()
    want = 0.5 * pl_r @ torch.diag(z - d_r) @ u_r
    torch.testing.assert_close(layer.delta_weight("default"), want, rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 24).to(dtype)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype
    reference = (x.float() @ (w32 + want).t() + base.bias.float()).to(dtype)
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("train_sigma", [False, True])
def test_trainable_values_per_matrix_and_sigma(train_sigma):
    case = MODEL_CASES["mlp"]
    model = _mlp_model("lu", train_sigma=train_sigma)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 2 * (4 + int(train_sigma))
    assert all(".loldu_z.default." in n for n in trainable)
    out = model(**case.labelled())
    out["loss"].backward()
    for layer in _layers(model):
        leaf = layer.loldu_z["default"]
        assert leaf.weight.grad is not None and leaf.weight.grad.abs().sum() > 0
        if train_sigma:
            # sigma scales the whole r-term LDU part, so it has a gradient even at the exact start
            assert leaf.sigma.grad is not None and leaf.sigma.grad.abs() > 0
            s = layer.scaling["default"]
            with torch.no_grad():
                leaf.sigma.fill_(2 * s)
            z, z0 = leaf.weight.detach(), layer.loldu_z0["default"]
            want = layer.loldu_PL["default"] @ torch.diag(2 * s * z - s * z0) @ layer.loldu_U["default"]
            torch.testing.assert_close(layer.delta_weight("default"), want)
        else:
            assert leaf.sigma is None


def test_diagonal_frozen_factor_product_matches_eager_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    a, b = torch.randn(4, 7, generator=g), torch.randn(6, 4, generator=g)
    m = torch.randn(4, generator=g, requires_grad=True)
    out = frozen_factor_product(x, a, m, b, 0.7)
    ref = 0.7 * ((x @ a.t()) * m) @ b.t()
    torch.testing.assert_close(out, ref)
    gy = torch.randn(out.shape, generator=g)
    for got, want in zip(torch.autograd.grad(out, (x, m), gy), torch.autograd.grad(ref, (x, m), gy)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("train_sigma", [False, True])
@pytest.mark.parametrize("tokens", [64, 512])
def test_saved_activations_are_t_times_r(tokens, train_sigma):
    torch.manual_seed(0)
    n, m, r = 96, 80, 8
    config = ortho_adapters.LoLDUConfig(r=r, target_modules=["0"], train_sigma=train_sigma)
    model = get_peft_model(nn.Sequential(nn.Linear(n, m)), config)
    layer = _layers(model)[0]
    owned = owned_storages(model)
    x = torch.randn(tokens, n, requires_grad=True)
    base_only = saved_activation_values(lambda: layer.base_layer(x), owned)
    adapted = saved_activation_values(lambda: layer(x), owned)
    # u = x U_r^T (T x r) plus the r-vector diag(sigma z - sigma0 z0); nothing of size T x n or T x m
    assert tokens * r <= adapted - base_only <= tokens * r + r


def test_config_defaults_and_validation():
    config = ortho_adapters.LoLDUConfig()
    assert (config.r, config.alpha, config.init, config.train_sigma) == (None, 1.0, "lu", False)
    assert config.store_factors is False
    with pytest.raises(ValueError, match="init"):
        ortho_adapters.LoLDUConfig(init="kaiming")
    with pytest.raises(ValueError, match="alpha"):
        ortho_adapters.LoLDUConfig(alpha=0.0)


def test_default_rank_is_full_rank_per_layer():
    case = MODEL_CASES["llama"]  # q_proj 32x32, v_proj 16x32 (grouped-query attention)
    model = get_peft_model(case.model(), ortho_adapters.LoLDUConfig(target_modules=["q_proj", "v_proj"]))
    ranks = {layer.module_name.split(".")[-1]: layer.r["default"] for layer in _layers(model)}
    assert ranks == {"q_proj": 32, "v_proj": 16}
    layer = _layers(model)[0]
    assert layer.loldu_PL["default"].shape[1] == layer.r["default"]


def _trained_loldu(store_factors: bool = False):
    case = MODEL_CASES["llama"]
    config = ortho_adapters.LoLDUConfig(target_modules=["q_proj", "v_proj"], store_factors=store_factors)
    model = get_peft_model(case.model(), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * p.abs().mean())
    return model, case


@pytest.mark.parametrize("store_factors", [False, True])
def test_saved_file_holds_factors_only_on_request_and_reload_is_exact(tmp_path, store_factors):
    from peft import PeftModel
    from safetensors.torch import load_file

    model, case = _trained_loldu(store_factors)
    with torch.no_grad():
        expected = logits(model, case.inputs())
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    has_factors = any("loldu_PL" in k or "loldu_U" in k for k in saved)
    assert has_factors == store_factors
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not store_factors:  # z, z0 and a 64-byte fingerprint per layer
        n_layers = len(_layers(model))
        assert sum(t.numel() for t in saved.values()) == 2 * trainable + 64 * n_layers
    reloaded = PeftModel.from_pretrained(case.model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(logits(reloaded, case.inputs()), expected)


def test_loading_onto_a_different_base_is_refused_naming_the_layer(tmp_path):
    from peft import PeftModel

    model, case = _trained_loldu()
    model.save_pretrained(tmp_path)
    other = case.model(seed=1)
    with pytest.raises(ValueError, match=r"q_proj.*different base weight"):
        PeftModel.from_pretrained(other, tmp_path)


def test_a_different_pivoting_is_refused(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    model, case = _trained_loldu()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = next(k for k in state if "fingerprint" in k)
    state[key][40] ^= 1  # corrupt the pivots' hash only
    save_file(state, path)
    with pytest.raises(ValueError, match="LU pivoting"):
        PeftModel.from_pretrained(case.model(), tmp_path)


def test_stored_factors_load_onto_any_base(tmp_path):
    from peft import PeftModel

    model, case = _trained_loldu(store_factors=True)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.model(seed=1), tmp_path)
    src = _layers(model)[0]
    dst = _layers(reloaded)[0]
    assert torch.equal(src.loldu_PL["default"], dst.loldu_PL["default"])
