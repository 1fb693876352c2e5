"""Bad data never corrupts an adapter silently (issue 21).

Every data-driven step (LoRA-SB's gradient init, the continual lifecycle, O3's unlearning with its detector
fit and calibration) and every init that reads a base weight (LoRA-SB ``init="svd"``, LoLDU's LU) goes
through ``ortho_adapters.core.finite.check_finite``: one NaN or Inf raises ``NonFiniteError`` naming the
step, the layer and NaN / Inf, and the model -- every parameter and buffer, bit for bit, plus task lists,
bases, O3 requests and gate statistics -- is exactly as before the call. On clean data the results are
bit-identical to the unguarded math (and to the same call with the check disabled). Degenerate but finite
cases warn instead.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch
from continual_helpers import inputs_only, task_batches, train_task
from continual_helpers import make_model as continual_model
from o3_helpers import lm_tokenizer, math_rows, tiny_detector_dir, tiny_lm
from peft import get_peft_model
from tiny_models import MODEL_CASES

import ortho_adapters
from ortho_adapters import LoLDUConfig, LoraSBConfig, NonFiniteError, initialize_lora_sb
from ortho_adapters import data as assets
from ortho_adapters.continual import end_task, start_task
from ortho_adapters.continual.layer import task_seed
from ortho_adapters.continual.subspace import complement_rows, extend_basis
from ortho_adapters.core import OrthoLayer, read_weight, truncated_svd
from ortho_adapters.core.finite import all_finite, check_finite
from ortho_adapters.fedsvd.aggregate import validate_updates
from ortho_adapters.loldu.decomposition import ldu_factors
from ortho_adapters.loldu.layer import LoLDULayer
from ortho_adapters.lora_sb.layer import PENDING_FACTORS_ATTR
from ortho_adapters.o3 import unlearn
from ortho_adapters.o3.layer import O3Layer

BAD = {"nan": float("nan"), "inf": float("inf")}


# ------------------------------------------------------------------------------------------ helpers
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so that NaN == NaN)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def snapshot(model: torch.nn.Module) -> dict:
    """Every parameter and buffer (persistent or not), the state dict and the requires_grad flags."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    now = snapshot(model)
    for part in ("params", "buffers", "state"):
        assert list(now[part]) == list(before[part]), part
        for key, value in before[part].items():
            other = now[part][key]
            assert other.dtype == value.dtype and other.shape == value.shape, key
            assert torch.equal(_bits(other), _bits(value)), key
    assert now["flags"] == before["flags"]


def assert_message(err: pytest.ExceptionInfo, step: str, layer: str | None, statistic: str) -> str:
    text = str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, NonFiniteError)
    assert text.startswith(f"{step}: "), text
    assert statistic in text, text
    if layer is not None:
        assert f"layer '{layer}'" in text and err.value.layer == layer, text
    assert err.value.kind in ("NaN", "Inf", "NaN and Inf") and f"has {err.value.kind} values" in text, text
    return text


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------- the shared check
@pytest.mark.parametrize(
    "values,kind", [([math.nan], "NaN"), ([math.inf], "Inf"), ([math.nan, -math.inf], "NaN and Inf")]
)
def test_check_names_step_layer_statistic_and_kind(values, kind):
    t = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    t.view(-1)[: len(values)] = torch.tensor(values)
    with pytest.raises(NonFiniteError) as err:
        check_finite(t, step="some_step", statistic="gradient sum", layer="model.lin0", hint="fix the data")
    text = assert_message(err, "some_step", "model.lin0", "gradient sum")
    assert text.endswith("; fix the data") and err.value.numel == 35
    assert (err.value.nan, err.value.inf) == (
        int(math.isnan(values[0])),
        len(values) - int(math.isnan(values[0])),
    )
    assert ortho_adapters.NonFiniteError is NonFiniteError
    for fine in (torch.randn(3, 3), torch.zeros(0), torch.arange(4), torch.randn(4).bfloat16(), 2.5):
        check_finite(fine, step="s", statistic="x")
    with pytest.raises(NonFiniteError, match="loss has NaN"):
        check_finite(float("nan"), step="s", statistic="loss")


def test_the_fused_check_agrees_with_isfinite_everywhere():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for shape in ((1,), (33,), (48, 40), (3, 5, 17)):
            t = torch.randn(shape, generator=g).to(dtype)
            assert all_finite(t) and all_finite(t.transpose(0, -1))
            for value in (math.nan, math.inf, -math.inf):
                for _ in range(5):
                    u = t.clone()
                    u.view(-1)[int(torch.randint(u.numel(), (1,), generator=g))] = value
                    assert not all_finite(u) and not all_finite(u.transpose(0, -1))


def test_truncated_svd_refuses_a_non_finite_matrix():
    m = torch.randn(6, 4)
    m[2, 1] = math.inf
    with pytest.raises(NonFiniteError) as err:
        truncated_svd(m, 2, step="my_init", statistic="base weight", layer="blocks.0.fc")
    assert_message(err, "my_init", "blocks.0.fc", "base weight")


# --------------------------------------------------------------------------------- LoRA-SB gradient init
def _lorasb(case: str = "mlp", **kw) -> torch.nn.Module:
    c = MODEL_CASES[case]
    config = LoraSBConfig(r=4, target_modules=list(c.targets), init="gradient", **kw)
    return _quiet(get_peft_model, c.model(), config)


def _bad_batch(seed: int, value: float) -> dict:
    batch = MODEL_CASES["mlp"].labelled(seed)
    batch["x"][3, 4] = value
    return batch


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_lora_sb_init_with_one_bad_value_raises_and_changes_nothing(bad):
    case = MODEL_CASES["mlp"]
    model = _lorasb(subtract_init=True)
    batches = [case.labelled(1), _bad_batch(2, BAD[bad]), case.labelled(3)]
    before = snapshot(model)
    with pytest.raises(NonFiniteError) as err:
        initialize_lora_sb(model, batches, step_size=1e-3, progress=False)
    text = assert_message(err, "initialize_lora_sb", "base_model.model.lin0", "gradient sum G")
    assert "loss of init batch 1 was" in text and "left unchanged" in text
    assert_unchanged(model, before)
    # the clean batches still give exactly the result of a model that never saw the bad one
    clean = [case.labelled(1), case.labelled(3)]
    got = initialize_lora_sb(model, clean, step_size=1e-3, progress=False)
    fresh = _lorasb(subtract_init=True)
    ref = initialize_lora_sb(fresh, clean, step_size=1e-3, progress=False)
    assert all(torch.equal(a, b) for k in ref for a, b in zip(got[k], ref[k]))
    assert_unchanged(model, snapshot(fresh))


def test_lora_sb_init_on_a_plain_model_leaves_no_pending_factors():
    case = MODEL_CASES["mlp"]
    base = case.model()
    base.lin0.weight.requires_grad_(False)  # mixed flags: restored exactly
    before = snapshot(base)
    config = LoraSBConfig(r=4, target_modules=list(case.targets), init="gradient")
    with pytest.raises(NonFiniteError, match=r"initialize_lora_sb: gradient sum .* layer 'lin0' has NaN"):
        initialize_lora_sb(base, [_bad_batch(1, math.nan)], config=config, step_size=1e-3, progress=False)
    assert not any(PENDING_FACTORS_ATTR in vars(m) for m in base.modules())
    assert_unchanged(base, before)


def test_lora_sb_init_batch_with_all_labels_ignored_raises_naming_the_loss():
    """GPT-2: a batch whose labels are all -100 has a NaN loss (and zero gradient): no junk factors."""
    case = MODEL_CASES["gpt2"]
    model = _lorasb("gpt2")
    ignored = case.labelled(2)
    ignored["labels"][:] = -100
    before = snapshot(model)
    with pytest.raises(NonFiniteError) as err:
        initialize_lora_sb(model, [case.labelled(1), ignored], step_size=1e-3, progress=False)
    assert_message(err, "initialize_lora_sb", None, "loss of init batch 1")
    assert "all -100" in str(err.value) and err.value.kind == "NaN"
    assert_unchanged(model, before)


def test_lora_sb_init_on_clean_data_is_exactly_the_unguarded_math(monkeypatch):
    case = MODEL_CASES["mlp"]
    batch = case.labelled(1)
    plain = case.model()
    plain(**batch)["loss"].backward()  # autograd's dW = sum dy^T x, the statistic the init accumulates
    model = _lorasb()
    result = initialize_lora_sb(model, [batch], step_size=1e-3, progress=False)
    for name in case.targets:
        u, s, vh = torch.linalg.svd(-1e-3 * torch.sign(getattr(plain, name).weight.grad), full_matrices=False)
        b, rmat, a = result[f"base_model.model.{name}"]
        assert torch.equal(b, u[:, :4]) and torch.equal(rmat, torch.diag(s[:4])) and torch.equal(a, vh[:4])
    # and with the checks disabled the whole call gives the same factors, loss values and model
    batches = [case.labelled(1), case.labelled(2)]
    guarded = _lorasb()
    res_guarded = initialize_lora_sb(guarded, batches, step_size=1e-3, progress=False)
    for module in ("ortho_adapters.lora_sb.init", "ortho_adapters.core.svd"):
        monkeypatch.setattr(f"{module}.check_finite", lambda *a, **k: None)
    unguarded = _lorasb()
    res_unguarded = initialize_lora_sb(unguarded, batches, step_size=1e-3, progress=False)
    assert (res_guarded.loss_before, res_guarded.loss_after) == (
        res_unguarded.loss_before,
        res_unguarded.loss_after,
    )
    assert all(torch.equal(a, b) for k in res_guarded for a, b in zip(res_guarded[k], res_unguarded[k]))
    assert_unchanged(guarded, snapshot(unguarded))


def test_lora_sb_init_warns_for_a_zero_gradient():
    model = _lorasb()
    with torch.no_grad():
        model.base_model.model.head.weight.zero_()  # no gradient reaches the targets
    with pytest.warns(UserWarning, match=r"gradient sum G of 2 layer\(s\) is exactly zero"):
        initialize_lora_sb(model, [MODEL_CASES["mlp"].labelled(1)], step_size=1e-3, progress=False)


# ------------------------------------------------------------------------- inits reading the base weight
BASE_WEIGHT_METHODS = {
    "lora_sb_svd": (lambda targets: LoraSBConfig(r=4, target_modules=targets), "LoRA-SB init='svd'"),
    "loldu": (lambda targets: LoLDUConfig(r=4, target_modules=targets), "LoLDU LU init"),
}
POISON = {"mlp": ("lin1", "nan"), "gpt2": ("transformer.h.1.attn.c_attn", "inf")}


@pytest.mark.parametrize("case", ["mlp", "gpt2"])
@pytest.mark.parametrize("method", list(BASE_WEIGHT_METHODS))
def test_non_finite_base_weight_raises_before_any_module_is_replaced(method, case):
    make_config, step = BASE_WEIGHT_METHODS[method]
    c = MODEL_CASES[case]
    base = c.model()
    layer, bad = POISON[case]
    with torch.no_grad():
        base.get_submodule(layer).weight[3, 2] = BAD[bad]
    before = snapshot(base)
    with pytest.raises(NonFiniteError) as err:
        get_peft_model(base, make_config(list(c.targets)))
    assert_message(err, step, layer, "base weight")
    assert err.value.kind == {"nan": "NaN", "inf": "Inf"}[bad]
    assert not any(isinstance(m, OrthoLayer) for m in base.modules()) and not hasattr(base, "peft_config")
    assert_unchanged(base, before)


@pytest.mark.parametrize("method", list(BASE_WEIGHT_METHODS))
def test_non_finite_base_weight_refuses_add_adapter_and_changes_nothing(method):
    make_config, step = BASE_WEIGHT_METHODS[method]
    c = MODEL_CASES["mlp"]
    model = get_peft_model(c.model(), make_config(list(c.targets)))
    with torch.no_grad():
        model.base_model.model.lin1.get_base_layer().weight[0, 0] = math.nan
    before = snapshot(model)
    with pytest.raises(NonFiniteError) as err:
        model.add_adapter("second", make_config(list(c.targets)))
    assert_message(err, step, "lin1", "base weight")
    assert list(model.peft_config) == ["default"]
    assert all(list(m.r) == ["default"] for m in model.modules() if isinstance(m, OrthoLayer))
    assert_unchanged(model, before)


def test_layer_created_directly_also_checks_its_base_weight():
    linear = torch.nn.Linear(6, 5)
    with torch.no_grad():
        linear.weight[1, 1] = math.inf
    with pytest.raises(NonFiniteError) as err:
        LoLDULayer(linear, "default", LoLDUConfig(r=2), module_name="enc.fc")
    assert_message(err, "LoLDU LU init", "enc.fc", "base weight")


def test_base_weight_inits_on_clean_weights_are_exactly_the_unguarded_math():
    c = MODEL_CASES["gpt2"]
    lora_sb = get_peft_model(c.model(), LoraSBConfig(r=4, target_modules=list(c.targets)))
    loldu = get_peft_model(c.model(), LoLDUConfig(r=4, target_modules=list(c.targets)))
    for model in (lora_sb, loldu):
        for layer in (m for m in model.modules() if isinstance(m, OrthoLayer)):
            weight = read_weight(layer)
            if model is lora_sb:
                u, s, vh = torch.linalg.svd(weight, full_matrices=False)
                assert torch.equal(layer.lora_sb_B["default"], (u[:, :4] * s[:4]).contiguous())
                assert torch.equal(layer.lora_sb_A["default"], vh[:4].contiguous())
            else:
                factors = ldu_factors(weight, 4)
                assert torch.equal(layer.loldu_PL["default"], factors.pl_r)
                assert torch.equal(layer.loldu_U["default"], factors.u_r)
                assert torch.equal(layer.loldu_z["default"].weight, factors.d_r)


def test_loldu_on_an_all_zero_weight_warns_that_z_cannot_move():
    c = MODEL_CASES["mlp"]
    base = c.model()
    with torch.no_grad():
        base.lin0.weight.zero_()
    with pytest.warns(UserWarning, match=r"LoLDU layer 'lin0': 4 of 4 entries of z cannot move.*all zero"):
        model = get_peft_model(base, LoLDUConfig(r=4, target_modules=list(c.targets)))
    model(**c.labelled(1))["loss"].backward()
    z = {n: m.loldu_z["default"].weight.grad for n, m in model.named_modules() if isinstance(m, LoLDULayer)}
    assert (
        torch.count_nonzero(z["base_model.model.lin0"]) == 0
        and torch.count_nonzero(z["base_model.model.lin1"]) > 0
    )


# -------------------------------------------------------------------------------- continual lifecycle
def _lifecycle_state(model) -> tuple:
    config = model.peft_config["default"]
    return snapshot(model), list(config.task_names), config.tasks_ended


def _assert_lifecycle_unchanged(model, before: tuple) -> None:
    state, names, ended = before
    assert_unchanged(model, state)
    config = model.peft_config["default"]
    assert config.task_names == names and config.tasks_ended == ended


def _poisoned(batches: list[dict], value: float) -> list[dict]:
    bad = [{"x": b["x"].clone()} for b in batches]
    bad[2]["x"][5, 7] = value
    return bad


@pytest.mark.parametrize("earlier_tasks", [0, 1])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_start_task_with_one_bad_value_raises_and_changes_nothing(bad, earlier_tasks):
    model = continual_model()
    for t in range(earlier_tasks):
        start_task(model, f"t{t}", inputs_only(task_batches(t)))
        train_task(model, task_batches(t), steps=3)
        end_task(model, inputs_only(task_batches(t)))
    data = inputs_only(task_batches(5))
    probe = {"x": torch.randn(4, 32, generator=torch.Generator().manual_seed(9))}
    with torch.no_grad():
        logits = model(**probe)["logits"]
    before = _lifecycle_state(model)
    with pytest.raises(NonFiniteError) as err:
        start_task(model, "new", _poisoned(data, BAD[bad]))
    assert_message(err, "continual.start_task", "base_model.model.lin0", "input covariance")
    _assert_lifecycle_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(
            model(**probe)["logits"], logits
        )  # clean inputs still give the same, finite logits
    # the same call on clean data installs exactly A = top-r eigenvectors of the projected covariance
    start_task(model, "new", data)
    for name, layer in model.named_modules():
        if isinstance(layer, OrthoLayer):
            basis = before[0]["buffers"].get(f"{name}.ortho_lora_M.default")
            seed = task_seed(0, f"{layer.module_name}.default", earlier_tasks)
            cov = _input_covariance(model, layer, data)
            ref = complement_rows(basis, layer.in_features, 4, cov, seed, name).float()
            assert torch.equal(layer.current_a("default"), ref), name


def _input_covariance(model, layer, batches) -> torch.Tensor:
    """``sum x^T x`` of ``layer``'s inputs, by hand (fp32 per batch, summed in fp64)."""
    seen = []
    handle = layer.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    cov = None
    for x in seen:
        c = (x.float().t() @ x.float()).double()
        cov = c if cov is None else cov + c
    return cov


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_end_task_with_one_bad_value_raises_and_keeps_the_task_open(bad):
    model = continual_model()
    data = inputs_only(task_batches(0))
    start_task(model, "a", data)
    train_task(model, task_batches(0), steps=3)
    before = _lifecycle_state(model)
    with pytest.raises(NonFiniteError) as err:
        end_task(model, _poisoned(data, BAD[bad]))
    assert_message(err, "continual.end_task", "base_model.model.lin0", "input covariance")
    _assert_lifecycle_unchanged(model, before)
    # clean data: the basis is exactly GPM's union computed from the hand-made covariance
    energy = model.peft_config["default"].energy_for_task(0)
    covs = {
        n: _input_covariance(model, m, data) for n, m in model.named_modules() if isinstance(m, OrthoLayer)
    }
    dims = end_task(model, data)
    for name, cov in covs.items():
        ref = extend_basis(None, cov, energy)
        assert dims[name] == ref.shape[1] > 0
        assert torch.equal(model.get_submodule(name).basis("default"), ref.float()), name


def test_continual_data_aware_init_checks_the_base_weights():
    model = continual_model()
    with torch.no_grad():
        model.base_model.model.lin1.get_base_layer().weight[2, 3] = math.nan
    before = _lifecycle_state(model)
    with pytest.raises(NonFiniteError) as err:
        start_task(model, "a", inputs_only(task_batches(0)))
    assert_message(err, "continual.start_task", "base_model.model.lin1", "base weight")
    _assert_lifecycle_unchanged(model, before)


def test_end_task_warns_when_a_basis_gains_no_direction():
    model = continual_model()
    start_task(model, "a")
    zeros = [{"x": torch.zeros(8, 32)}]
    with pytest.warns(
        UserWarning, match=r"input basis of layer 'base_model.model.lin0' gained no direction.*all zero"
    ):
        dims = end_task(model, zeros)
    assert dims["base_model.model.lin0"] == 0 and dims["base_model.model.lin1"] > 0


# ------------------------------------------------------------------------------------------------ O3
@pytest.fixture(scope="module")
def tok():
    return lm_tokenizer()


def _o3(tmp_path, tok, first_request: bool):
    config = ortho_adapters.O3Config(
        r=4, detector_model=str(tiny_detector_dir(tmp_path)), gate_tokenizer=str(assets.smollm2_dir())
    )
    model = get_peft_model(tiny_lm(len(tok)), config)
    if first_request:
        _quiet(unlearn, model, math_rows(10), "first", tokenizer=tok, epochs=1, lr=1e-2, detector_epochs=1)
    return model


def _o3_state(model) -> tuple:
    base = model.base_model
    gate = base.o3_gate_state.gate("default", model.peft_config["default"])
    stats = {r: {k: v.clone() for k, v in s.tensors().items()} for r, s in gate.stats.items()}
    detector = None if gate.detector is None else gate.detector.requests
    layers = {n: dict(m.requests) for n, m in model.named_modules() if isinstance(m, O3Layer)}
    return snapshot(model), list(model.peft_config["default"].requests), layers, stats, detector


def _assert_o3_unchanged(model, before: tuple) -> None:
    state, requests, layers, stats, detector = before
    assert_unchanged(model, state)
    now = _o3_state(model)
    assert now[1] == requests and now[2] == layers and now[4] == detector
    assert list(now[3]) == list(stats)
    for request, tensors in stats.items():
        assert all(torch.equal(_bits(now[3][request][k]), _bits(v)) for k, v in tensors.items())


def test_unlearn_checks_its_arguments_before_touching_the_model(tmp_path, tok):
    model = _o3(tmp_path, tok, first_request=False)
    before = _o3_state(model)
    rows = math_rows(5)
    cases = [
        (dict(forget_data=None), "forget_data"),
        (dict(forget_data=[]), "forget_data"),
        (dict(forget_data=iter(rows)), "forget_data"),
        (dict(tokenizer=None), "tokenizer"),
        (dict(tokenizer=object()), "tokenizer"),
        (dict(epochs=-1), "epochs"),
        (dict(lr=math.nan), "lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_length=0), "max_length"),
        (dict(detector_lr=0.0), "detector_lr"),
        (dict(refusal=None), "refusal"),
        (dict(holdout=1.5), "holdout"),
    ]
    for override, argument in cases:
        kwargs = {"forget_data": rows, "tokenizer": tok, **override}
        forget = kwargs.pop("forget_data")
        with pytest.raises(ValueError, match=f"`{argument}`"):
            unlearn(model, forget, "x", **kwargs)
    gate = model.base_model.o3_gate_state.gates["default"]
    assert gate.detector is None  # failed before even loading the detector
    _assert_o3_unchanged(model, before)


def _poison_lm(model):
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if module.training and len(calls) == 2:  # the second training batch
            output = output.clone()
            output[0, 0, 0] = math.nan
        return output

    return model.base_model.model.model.layers[0].mlp.register_forward_hook(hook)


def _poison_lm_gradient(model):
    calls = []

    def hook(module, grad_input, grad_output):  # the last (third) training batch: finite loss, Inf gradient
        calls.append(1)
        if len(calls) < 3:
            return None
        return tuple(None if g is None else g.clone().fill_(math.inf) for g in grad_input)

    return model.base_model.model.model.layers[1].mlp.register_full_backward_hook(hook)


def _poison_detector(model, when_training: bool):
    detector = model.base_model.o3_gate_state.gates["default"].get_detector()

    def hook(module, args, output):
        if module.training == when_training:
            output = output.clone()
            output[0, 0, 0] = math.nan
        return output

    return detector.encoder.encoder.layer[1].output.register_forward_hook(hook)


O3_STAGES = {
    "lm_loss": (_poison_lm, None, "LM training loss of epoch 0, batch 1"),
    "lm_gradient": (
        _poison_lm_gradient,
        "base_model.model.model.layers.0.self_attn.q_proj",
        "trained factor",
    ),
    "detector_loss": (lambda m: _poison_detector(m, True), None, "detector training loss"),
    "detector_features": (lambda m: _poison_detector(m, False), "detector layer 1", "detector features"),
}


@pytest.mark.parametrize("stage", list(O3_STAGES))
def test_unlearn_rolls_a_request_back_on_a_non_finite_value(tmp_path, tok, stage):
    poison, layer, statistic = O3_STAGES[stage]
    model = _o3(tmp_path, tok, first_request=True)  # a frozen earlier request and a trained detector LoRA
    before = _o3_state(model)
    handle = poison(model)
    with pytest.raises(NonFiniteError) as err:
        _quiet(
            unlearn,
            model,
            math_rows(12),
            "second",
            tokenizer=tok,
            epochs=1,
            lr=1e-2,
            batch_size=4,
            detector_epochs=1,
        )
    handle.remove()
    assert_message(err, "o3.unlearn", layer, statistic)
    _assert_o3_unchanged(model, before)
    assert model.base_model.o3_gate_state.gates["default"].get_detector().requests == ["first"]


def test_unlearn_on_clean_data_is_unchanged_by_the_checks(tmp_path, tok, monkeypatch):
    def run():
        model = _o3(tmp_path, tok, first_request=False)
        info = _quiet(unlearn, model, math_rows(10), "a", tokenizer=tok, epochs=1, lr=1e-2, detector_epochs=1)
        return model, info

    guarded, info_guarded = run()
    for module in ("unlearn", "scores", "detector"):  # (the package's `unlearn` shadows its module)
        monkeypatch.setattr(sys.modules[f"ortho_adapters.o3.{module}"], "check_finite", lambda *a, **k: None)
    unguarded, info_unguarded = run()
    assert info_guarded == info_unguarded
    assert_unchanged(guarded, snapshot(unguarded))
    gates = [m.base_model.o3_gate_state.state_tensors("default") for m in (guarded, unguarded)]
    assert list(gates[0]) == list(gates[1]) and all(torch.equal(gates[0][k], gates[1][k]) for k in gates[0])


# ------------------------------------------------------------------------------------------------ FedSVD
def test_fedsvd_validation_uses_the_shared_check():
    glob = {"layer.fedsvd_B.weight": torch.zeros(4, 2), "layer.fedsvd_A": torch.eye(2, 6)}
    client = copy.deepcopy(glob)
    client["layer.fedsvd_B.weight"][1, 1] = -math.inf
    with pytest.raises(NonFiniteError) as err:
        validate_updates(glob, [glob, client], [3, 4], client_names=["alice", "bob"])
    text = assert_message(err, "validate_updates", None, "bob: tensor 'layer.fedsvd_B.weight'")
    assert err.value.kind == "Inf" and "nothing was aggregated" in text
