"""LoRA-SB beyond the conformance battery: the autograd function, saved activations, gradient init."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from saved_tensors import owned_storages, saved_activation_values
from tiny_models import MODEL_CASES, logits
from torch import nn

import ortho_adapters
from ortho_adapters.core import frozen_factor_product
from ortho_adapters.lora_sb import LoraSBLayer


def test_frozen_factor_product_matches_eager_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    a, b = torch.randn(4, 7, generator=g), torch.randn(6, 4, generator=g)
    m = torch.randn(4, 4, generator=g, requires_grad=True)
    b_train = b.clone().requires_grad_(True)
    out = frozen_factor_product(x, a, m, b_train, 0.7)
    ref = 0.7 * (x @ a.t() @ m.t() @ b_train.t())
    torch.testing.assert_close(out, ref)
    gy = torch.randn_like(out, generator=g) if hasattr(torch, "randn_like") else torch.randn(out.shape)
    got = torch.autograd.grad(out, (x, m, b_train), gy)
    want = torch.autograd.grad(ref, (x, m, b_train), gy)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want)
    # M = None is the identity (FedSVD-style client: only B trains)
    out2 = frozen_factor_product(x, a, None, b_train, 1.0)
    torch.testing.assert_close(out2, x @ a.t() @ b_train.t())


@pytest.mark.parametrize("tokens", [64, 512])
def test_saved_activations_are_at_most_t_times_r(tokens):
    torch.manual_seed(0)
    n, m, r = 96, 80, 8
    base = nn.Linear(n, m)
    model = get_peft_model(nn.Sequential(base), ortho_adapters.LoraSBConfig(r=r, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert isinstance(layer, LoraSBLayer)
    owned = owned_storages(model)
    x = torch.randn(tokens, n, requires_grad=True)
    base_only = saved_activation_values(lambda: layer.base_layer(x), owned)
    adapted = saved_activation_values(lambda: layer(x), owned)
    assert 0 < adapted - base_only <= tokens * r  # u = x A^T, nothing of size T x n
    # the counter does see x: PEFT's LoRA (trainable A) must keep it
    lora = get_peft_model(nn.Sequential(nn.Linear(n, m)), LoraConfig(r=r, target_modules=["0"]))
    lora_owned = owned_storages(lora)
    assert saved_activation_values(lambda: lora.base_model.model[0](x), lora_owned) >= tokens * n


def _dataloader(case, n_batches: int = 3):
    return [case.labelled(seed=10 + i) for i in range(n_batches)]


def _reference_update(case, lr: float, update: str, n_batches: int = 3) -> dict[str, torch.Tensor]:
    """Full fine-tuning gradients of the target weights through plain autograd (independent of the hooks)."""
    model = case.model()
    for p in model.parameters():
        p.requires_grad_(True)
    for batch in _dataloader(case, n_batches):
        out = model(**batch)
        (out["loss"] if isinstance(out, dict) else out.loss).backward()
    deltas = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in case.targets:
            grad = module.weight.grad / n_batches
            if type(module).__name__ == "Conv1D":
                grad = grad.t()
            delta = -lr * (grad.sign() if update == "sign" else grad / grad.norm())
            deltas[name] = delta
    return deltas


def _best_rank_r(matrix: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double())
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("model_name", ["mlp", "gpt2", "llama"])
@pytest.mark.parametrize("update", ["sign", "grad"])
def test_gradient_init_is_best_rank_r_of_first_update(model_name, update):
    case = MODEL_CASES[model_name]
    r, lr = 4, 1e-3
    reference = _reference_update(case, lr, update)
    config = ortho_adapters.LoraSBConfig(r=r, target_modules=list(case.targets), init="gradient")
    base = case.model()
    ortho_adapters.initialize_lora_sb(
        base, _dataloader(case), config=config, num_samples=None, lr=lr, update=update, progress=False
    )
    model = get_peft_model(base, config)
    layers = {
        n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraSBLayer)
    }
    assert set(layers) == set(reference)
    for name, layer in layers.items():
        b, a = layer.lora_sb_B["default"], layer.lora_sb_A["default"]
        torch.testing.assert_close(b.t() @ b, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.t(), torch.eye(r), atol=1e-5, rtol=0)
        want = _best_rank_r(reference[name], r).float()
        torch.testing.assert_close(layer.delta_weight("default"), want, atol=1e-5, rtol=1e-4)


def test_gradient_init_after_get_peft_model_equals_before():
    case = MODEL_CASES["llama"]
    config = ortho_adapters.LoraSBConfig(r=4, target_modules=list(case.targets), init="gradient")
    before = case.model()
    ortho_adapters.initialize_lora_sb(
        before, _dataloader(case), config=config, num_samples=None, progress=False
    )
    before = get_peft_model(before, config)
    with pytest.warns(UserWarning, match="no gradient factors yet"):
        after = get_peft_model(
            case.model(), ortho_adapters.LoraSBConfig(**{**config.to_dict(), "peft_type": None})
        )
    rng = torch.get_rng_state()
    ortho_adapters.initialize_lora_sb(after, _dataloader(case), num_samples=None, progress=False)
    assert torch.equal(rng, torch.get_rng_state()), "the gradient init must not touch the global RNG"
    with torch.no_grad():
        torch.testing.assert_close(logits(after, case.inputs()), logits(before, case.inputs()))
    assert all(p.grad is None for p in after.parameters())


def test_subtract_init_starts_at_base_and_default_starts_one_step_away():
    case = MODEL_CASES["mlp"]
    with torch.no_grad():
        base_logits = logits(case.model(), case.inputs())
    results = {}
    for subtract in (False, True):
        config = ortho_adapters.LoraSBConfig(
            r=4, target_modules=list(case.targets), init="gradient", subtract_init=subtract
        )
        model = case.model()
        ortho_adapters.initialize_lora_sb(model, _dataloader(case), config=config, lr=0.05, progress=False)
        model = get_peft_model(model, config)
        with torch.no_grad():
            results[subtract] = logits(model, case.inputs())
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 16
    torch.testing.assert_close(results[True], base_logits, rtol=0, atol=1e-6)
    assert (results[False] - base_logits).abs().max() > 1e-3


def test_gradient_factors_survive_save_and_reload(tmp_path):
    case = MODEL_CASES["gpt2"]
    config = ortho_adapters.LoraSBConfig(
        r=4, target_modules=list(case.targets), init="gradient", subtract_init=True
    )
    model = case.model()
    ortho_adapters.initialize_lora_sb(model, _dataloader(case), config=config, lr=0.05, progress=False)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
        expected = logits(model, case.inputs())
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(case.model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, case.inputs()), expected, rtol=0, atol=0)
    src = dict(model.named_buffers())
    for name, buf in loaded.named_buffers():
        if "lora_sb_" in name:
            assert torch.equal(buf, src[name])


def test_initialize_errors_are_clear():
    case = MODEL_CASES["mlp"]
    with pytest.raises(ValueError, match="exactly one"):
        ortho_adapters.initialize_lora_sb(case.model(), None)
    with pytest.raises(ValueError, match="config"):
        ortho_adapters.initialize_lora_sb(case.model(), _dataloader(case))
    config = ortho_adapters.LoraSBConfig(r=4, target_modules=["nope"], init="gradient")
    with pytest.raises(ValueError, match="No module"):
        ortho_adapters.initialize_lora_sb(case.model(), _dataloader(case), config=config)
    with pytest.raises(ValueError, match="update"):
        ortho_adapters.initialize_lora_sb(case.model(), _dataloader(case), config=config, update="adam")
