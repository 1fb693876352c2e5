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
from ortho_adapters.core.compat import needs
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
        base, _dataloader(case), config=config, num_samples=None, step_size=lr, update=update, progress=False
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
        before, _dataloader(case), config=config, num_samples=None, step_size=1e-3, progress=False
    )
    before = get_peft_model(before, config)
    with pytest.warns(UserWarning, match="no gradient factors yet"):
        after = get_peft_model(
            case.model(), ortho_adapters.LoraSBConfig(**{**config.to_dict(), "peft_type": None})
        )
    rng = torch.get_rng_state()
    ortho_adapters.initialize_lora_sb(
        after, _dataloader(case), num_samples=None, step_size=1e-3, progress=False
    )
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
        ortho_adapters.initialize_lora_sb(
            model, _dataloader(case), config=config, step_size=0.05, progress=False
        )
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
    ortho_adapters.initialize_lora_sb(model, _dataloader(case), config=config, step_size=0.05, progress=False)
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
        ortho_adapters.initialize_lora_sb(case.model(), _dataloader(case), step_size=1e-3)
    config = ortho_adapters.LoraSBConfig(r=4, target_modules=["nope"], init="gradient")
    with pytest.raises(ValueError, match="No module"):
        ortho_adapters.initialize_lora_sb(case.model(), _dataloader(case), config=config, step_size=1e-3)
    with pytest.raises(ValueError, match="update"):
        ortho_adapters.initialize_lora_sb(
            case.model(), _dataloader(case), config=config, step_size=1e-3, update="adam"
        )


# ------------------------------------------------------------- the gradient pass forms no parameter gradient


def _init(model, batches, config=None, **kwargs):
    kwargs.setdefault("step_size", 1e-3)
    return ortho_adapters.initialize_lora_sb(
        model, batches, config=config, num_samples=None, progress=False, **kwargs
    )


def _config(case, **kwargs):
    return ortho_adapters.LoraSBConfig(r=4, target_modules=list(case.targets), init="gradient", **kwargs)


@pytest.mark.parametrize("model_name", ["mlp", "llama", "gpt2"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "peft"])
def test_gradient_pass_forms_no_parameter_gradient(model_name, wrapped):
    """No parameter gradient is ever accumulated; flags and the user's own ``.grad`` are left as they were.

    The accumulate hooks fire whenever autograd writes a parameter's ``.grad``: with every parameter left
    trainable during the pass (the old behaviour), all of them fire.
    """
    case = MODEL_CASES[model_name]
    config = _config(case)
    model = case.model()
    if wrapped:
        with pytest.warns(UserWarning, match="no gradient factors yet"):
            model = get_peft_model(model, config)
        for p in model.parameters():
            p.requires_grad_(True)  # a user who unfroze everything: still no gradient may be formed
    params = dict(model.named_parameters())
    names = sorted(params)
    flags = {n: i % 3 != 0 for i, n in enumerate(names)}  # a mixed pattern that must come back exactly
    user_grads = {n: torch.full_like(params[n], 7.0) for n in names[::4]}
    accumulated = []
    for n, p in params.items():
        p.requires_grad_(flags[n])
        if n in user_grads:
            p.grad = user_grads[n]
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda t, n=n: accumulated.append(n))
    seen_flags = []

    def forward_backward():
        seen_flags.append({n for n, p in model.named_parameters() if p.requires_grad})
        for batch in _dataloader(case):
            out = model(**batch)
            (out["loss"] if isinstance(out, dict) else out.loss).backward()

    if wrapped:
        ortho_adapters.initialize_lora_sb(model, train_step=forward_backward, step_size=1e-3, progress=False)
    else:
        ortho_adapters.initialize_lora_sb(
            model, train_step=forward_backward, config=config, step_size=1e-3, progress=False
        )
    assert seen_flags == [set()], "a parameter required grad during the gradient pass"
    assert accumulated == [], f"parameter gradients were formed: {accumulated[:5]}"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        if n in user_grads:
            assert p.grad is user_grads[n] and bool((p.grad == 7.0).all()), n
        else:
            assert p.grad is None, n


def test_flags_and_hooks_are_restored_when_the_pass_fails():
    case = MODEL_CASES["llama"]
    model = case.model()
    flags = {n: "layers.0" in n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])

    def failing_step():
        out = model(**case.labelled())
        out.loss.backward()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ortho_adapters.initialize_lora_sb(
            model, train_step=failing_step, config=_config(case), step_size=1e-3, progress=False
        )
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules()), "hooks left behind"
    assert not any(hasattr(m, "_lora_sb_pending_factors") for m in model.modules())


class _BigEmbeddingModel(nn.Module):
    """A 10 MB untargeted embedding (an LLM's typical large frozen part) feeding a small target."""

    VOCAB = 40_000

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.VOCAB, 64)
        self.proj = nn.Linear(64, 64)
        self.head = nn.Linear(64, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def hidden(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(embedded)).mean(1))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.hidden(self.embed(input_ids))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def _peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated minus freed while ``fn`` runs (torch profiler's CPU memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_gradient_pass_peak_memory_is_a_forward_backward_without_parameter_gradients():
    """The pass's peak stays at a forward + backward with every parameter frozen, plus the target's sum G.

    With the untargeted embedding trainable during the pass (the old behaviour) its 10 MB dense gradient
    alone exceeds the bound (measured: 20.5 MB peak against 0.08 MB).
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, _BigEmbeddingModel.VOCAB, (4, 16), generator=g),
            "labels": torch.arange(4) % 2,
        }
        for _ in range(2)
    ]
    model = _BigEmbeddingModel()
    frozen = _BigEmbeddingModel()
    frozen.load_state_dict(model.state_dict())
    frozen.requires_grad_(False)

    def reference():  # what the pass must cost: activations and their gradients only
        for batch in batches:
            x = frozen.embed(batch["input_ids"]).requires_grad_()
            nn.functional.cross_entropy(frozen.hidden(x), batch["labels"]).backward()

    config = ortho_adapters.LoraSBConfig(r=4, target_modules=["proj"], init="gradient")
    baseline = _peak_cpu_bytes(reference)
    peak = _peak_cpu_bytes(lambda: _init(model, batches, config, loss_check=False))
    sums = 64 * 64 * 4
    embedding = model.embed.weight.numel() * 4
    assert peak <= baseline + sums + 64 * 1024, (peak, baseline)
    assert peak < embedding / 10
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- eta


def test_step_size_from_learning_rate_and_warmup():
    resolve = ortho_adapters.lora_sb.init.resolve_step_size
    assert resolve(step_size=2e-4) == 2e-4
    assert resolve(learning_rate=5e-3, warmup_steps=10) == pytest.approx(5e-4)
    assert resolve(learning_rate=5e-3, warmup_steps=0) == 5e-3  # no warm-up: the first step is lr itself
    assert resolve(learning_rate=5e-3, warmup_steps=0.1, num_training_steps=45) == pytest.approx(5e-3 / 5)
    with pytest.raises(ValueError, match="num_training_steps"):
        resolve(learning_rate=5e-3, warmup_steps=0.1)

    # the same factors as step_size = learning_rate / warmup_steps, and the eta used is reported
    case = MODEL_CASES["mlp"]
    a = _init(
        case.model(), _dataloader(case), _config(case), step_size=None, learning_rate=5e-3, warmup_steps=10
    )
    b = _init(case.model(), _dataloader(case), _config(case), step_size=5e-4)
    assert a.step_size == pytest.approx(5e-4) and b.step_size == 5e-4
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0)


@pytest.mark.skipif(bool(needs("transformers-5")), reason=str(needs("transformers-5")))
def test_step_size_from_training_arguments(tmp_path):
    from transformers import TrainingArguments

    resolve = ortho_adapters.lora_sb.init.resolve_step_size

    def args(**kwargs):
        return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)

    assert resolve(training_args=args(learning_rate=1e-3, warmup_steps=4)) == pytest.approx(2.5e-4)
    assert resolve(training_args=args(learning_rate=1e-3)) == pytest.approx(1e-3)  # no warm-up
    ratio = args(learning_rate=1e-3, warmup_steps=0.05)
    assert resolve(training_args=ratio, num_training_steps=200) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="num_training_steps"):
        resolve(training_args=ratio)
    # max_steps fixes the total; transformers counts ceil(ratio * total) warm-up steps
    assert resolve(training_args=args(learning_rate=1e-3, warmup_steps=0.05, max_steps=30)) == pytest.approx(
        1e-3 / 2
    )
    # a scheduler without warm-up starts at the full learning rate
    constant = args(learning_rate=1e-3, warmup_steps=4, lr_scheduler_type="constant")
    assert resolve(training_args=constant) == pytest.approx(1e-3)

    case = MODEL_CASES["mlp"]
    result = _init(case.model(), _dataloader(case), _config(case), step_size=None, training_args=args(
        learning_rate=1e-3, warmup_steps=4
    ))  # fmt: skip
    assert result.step_size == pytest.approx(2.5e-4)


@pytest.mark.parametrize("warmup", [0, 7, 0.05, 0.5])
def test_step_size_follows_the_trainers_own_warmup(tmp_path, warmup):
    """eta = learning_rate / (the warm-up steps transformers' own scheduler uses), whichever way the installed
    transformers spells a ratio (``warmup_steps`` < 1 from 5.0, ``warmup_ratio`` in 4.x)."""
    from transformers import TrainingArguments

    from ortho_adapters.core.compat import TRANSFORMERS_5

    spelling = {"warmup_steps": warmup} if TRANSFORMERS_5 or warmup >= 1 else {"warmup_ratio": warmup}
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-3, **spelling)
    eta = ortho_adapters.lora_sb.init.resolve_step_size(training_args=args, num_training_steps=200)
    assert eta == pytest.approx(1e-3 / max(args.get_warmup_steps(200), 1))
    assert (eta < 1e-3) == (warmup > 0)


def test_step_size_errors_are_clear():
    case = MODEL_CASES["mlp"]
    model, data, config = case.model(), _dataloader(case), _config(case)
    init = ortho_adapters.initialize_lora_sb
    with pytest.raises(ValueError, match="step size eta.*FIRST optimizer step"):
        init(model, data, config=config)
    with pytest.raises(ValueError, match="several sources.*step_size, learning_rate"):
        init(model, data, config=config, step_size=1e-4, learning_rate=1e-3, warmup_steps=10)
    with pytest.raises(TypeError, match="no longer takes lr=.*step_size=.*learning_rate=.*warmup_steps="):
        init(model, data, config=config, lr=1e-3)
    with pytest.raises(ValueError, match="needs warmup_steps"):
        init(model, data, config=config, learning_rate=5e-3)
    with pytest.raises(ValueError, match="warmup_steps= only goes with learning_rate="):
        init(model, data, config=config, step_size=1e-4, warmup_steps=10)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        init(model, data, config=config, step_size=-1e-3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        init(model, data, config=config, step_size=1e-3, eta=1e-3)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(hasattr(m, "_lora_sb_pending_factors") for m in model.modules())


# ----------------------------------------------------------------------------------------------- loss check


def _loss_rise_warnings(record) -> list:
    return [w for w in record if "raised the mean loss" in str(w.message)]


def test_loss_check_warns_for_a_too_large_step_size_only():
    case = MODEL_CASES["mlp"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        small = _init(case.model(), _dataloader(case), _config(case), step_size=1e-3)
    assert not _loss_rise_warnings(record)
    assert small.loss_after < small.loss_before * 1.01

    with pytest.warns(UserWarning, match=r"raised the mean loss .* eta=1\b.*FIRST optimizer step") as record:
        large = _init(case.model(), _dataloader(case), _config(case), step_size=1.0)
    assert large.loss_after > 2 * large.loss_before and large.loss_rise > 1.0
    assert f"{large.loss_before:.4f}" in str(_loss_rise_warnings(record)[0].message)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        unchecked = _init(case.model(), _dataloader(case), _config(case), step_size=1.0, loss_check=False)
    assert not _loss_rise_warnings(record) and unchecked.loss_after is None
    assert unchecked.loss_before == pytest.approx(large.loss_before)

    # subtract_init starts exactly at the base model: nothing to warn about, no extra forward
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        exact = _init(case.model(), _dataloader(case), _config(case, subtract_init=True), step_size=1.0)
    assert not _loss_rise_warnings(record) and exact.loss_after == exact.loss_before


@pytest.mark.parametrize("model_name", ["mlp", "gpt2"])
def test_loss_after_is_the_installed_models_loss_and_the_model_is_untouched(model_name):
    case = MODEL_CASES[model_name]
    config = _config(case)
    model = case.model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = _init(model, _dataloader(case), config, step_size=0.05)
    assert not any(m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k

    def mean_loss(m):
        with torch.no_grad():
            losses = [m(**batch) for batch in _dataloader(case)]
        return sum(float(out["loss"] if isinstance(out, dict) else out.loss) for out in losses) / len(losses)

    assert result.loss_before == pytest.approx(mean_loss(model), rel=1e-5)
    peft_model = get_peft_model(model, config)
    assert result.loss_after == pytest.approx(mean_loss(peft_model), rel=1e-5)
    assert abs(result.loss_after - result.loss_before) > 1e-4

    # after get_peft_model (factors replaced in place): the same numbers, measured with adapters off + hooks
    again = ortho_adapters.initialize_lora_sb(
        peft_model, _dataloader(case), num_samples=None, step_size=0.05, progress=False
    )
    assert again.loss_before == pytest.approx(result.loss_before, rel=1e-5)
    assert again.loss_after == pytest.approx(mean_loss(peft_model), rel=1e-5)


class _DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.drop, self.head = nn.Linear(10, 32), nn.Dropout(0.5), nn.Linear(32, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.head(self.drop(torch.relu(self.lin0(x))))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def test_loss_check_in_train_mode_replays_the_dropout_masks():
    """The check forward sees the gradient pass's dropout masks, so a negligible step changes nothing."""
    case = MODEL_CASES["mlp"]
    torch.manual_seed(0)
    model = _DropoutMLP().train()
    config = ortho_adapters.LoraSBConfig(r=4, target_modules=["lin0"], init="gradient")
    twin = _DropoutMLP().train()
    twin.load_state_dict(model.state_dict())
    torch.manual_seed(123)
    result = _init(model, _dataloader(case), config, step_size=1e-9)
    rng_after = torch.get_rng_state()
    torch.manual_seed(123)
    _init(twin, _dataloader(case), config, step_size=1e-9, loss_check=False)
    assert torch.equal(rng_after, torch.get_rng_state()), "the loss check must not advance the global RNG"
    assert result.loss_after == pytest.approx(result.loss_before, abs=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_init_under_gradient_checkpointing_matches(reentrant):
    """Checkpointed blocks (the recomputation runs the hooks again) give the same factors, each G once."""
    case = MODEL_CASES["llama"]
    want = _init(case.model(), _dataloader(case), _config(case))
    model = case.model().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = _init(model, _dataloader(case), _config(case))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name][0] @ got[name][1] @ got[name][2], want[name][0] @ want[name][1] @ want[name][2]
        )
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("model_name", ["mlp", "gpt2", "llama"])
def test_randomized_svd_init_is_within_one_percent_of_the_exact_truncation(model_name):
    """``svd="randomized"``: ``||dW - B R A||_F <= 1.01 ||dW - [dW]_r||_F`` against plain-autograd ``dW``."""
    case = MODEL_CASES[model_name]
    r, lr = 4, 1e-3
    reference = _reference_update(case, lr, "sign")
    config = ortho_adapters.LoraSBConfig(r=r, target_modules=list(case.targets), init="gradient")
    result = ortho_adapters.initialize_lora_sb(
        case.model(),
        _dataloader(case),
        config=config,
        num_samples=None,
        step_size=lr,
        svd="randomized",
        progress=False,
    )
    assert set(result) == set(reference)
    for name, (b, rmat, a) in result.items():
        torch.testing.assert_close(b.t() @ b, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.t(), torch.eye(r), atol=1e-5, rtol=0)
        delta = reference[name].double()
        best = (delta - _best_rank_r(delta, r)).norm()
        assert (delta - (b @ rmat @ a).double()).norm() <= 1.01 * best, name


def test_svd_method_is_checked_before_the_pass():
    case = MODEL_CASES["mlp"]
    with pytest.raises(ValueError, match="svd must be one of"):
        _init(case.model(), _dataloader(case), _config(case), svd="lowrank")
