"""Mixed precision as users train: ``torch.autocast`` (``Trainer(bf16=True)``) on fp32 and bf16 bases.

References: the same model run in fp32 without autocast (outputs and adapter gradients within bf16
tolerance), and the dtypes of the matmuls and casts actually dispatched (``TorchDispatchMode``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conformance_cases import METHOD_CASES
from peft import get_peft_model
from tiny_models import MODEL_CASES, tiny_lm_trainer
from torch.utils._python_dispatch import TorchDispatchMode

METHODS = sorted(METHOD_CASES)
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
TOKENS = 7  # a batch size no layer width equals, so activation-shaped tensors are recognisable


class DispatchLog(TorchDispatchMode):
    """Records the input dtypes of every matmul and every dtype conversion dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls: list[tuple[str, tuple[torch.dtype, ...], tuple[tuple[int, ...], ...]]] = []
        self.casts: list[tuple[torch.dtype, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.matmuls.append(
                (name, tuple(t.dtype for t in tensors), tuple(tuple(t.shape) for t in tensors))
            )
        if name == "_to_copy" and isinstance(out, torch.Tensor):
            self.casts.append((args[0].dtype, out.dtype, tuple(out.shape)))
        return out


def _model(method: str, dtype: torch.dtype):
    case = MODEL_CASES["mlp"]
    config = METHOD_CASES[method].make_config(case.targets, init_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(case.model().to(dtype), config)
    model.train()
    return model


def _batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, 10, generator=g)
    return {"x": x.to(dtype), "labels": (x[:, 0] > 0).long()}


def _run(model, batch, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out["logits"].detach().float(), grads


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_autocast_matches_fp32_reference(method, base_dtype):
    model = _model(method, base_dtype)
    reference = copy.deepcopy(model).to(torch.float32)  # base and adapter in fp32, same values
    ref_logits, ref_grads = _run(reference, _batch(torch.float32), autocast=False)
    logits, grads = _run(model, _batch(base_dtype), autocast=True)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert grads.keys() == ref_grads.keys()
    torch.testing.assert_close(logits, ref_logits, rtol=5e-2, atol=5e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        # bf16 through every layer of the network: relative error of the whole gradient, not per entry
        ref = ref_grads[name]
        assert (grad - ref).norm() <= 0.15 * ref.norm(), name


def _eager_frozen_factor_product(x, a, m, b, scaling=1.0):
    """Plain-autograd ``s ((x A^T) M^T) B^T``: what autocast does with ordinary ops."""
    u = x @ a.t()
    if m is not None:
        u = u * m if m.dim() == 1 else u @ m.t()
    return (u @ b.t()) * scaling


def _eager_hadamard_linear(x, w0, bias, b, a, scaling, include_base=True, dtype=None):
    """Plain-autograd ``x (W0 ⊙ M)^T + bias`` with ``M`` formed in fp32 and the GEMM in ``dtype``."""
    multiplier = (b.float() @ a.float()) * scaling + (1.0 if include_base else 0.0)
    dtype = dtype or w0.dtype
    weight = (w0.float() * multiplier).to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_custom_backward_matches_plain_autograd_under_autocast(method, base_dtype, monkeypatch):
    """The custom autograd functions give what plain autograd gives under the same autocast region."""
    import ortho_adapters.core.leaf as leaf
    import ortho_adapters.hut.layer as hut_layer

    model = _model(method, base_dtype)
    reference = copy.deepcopy(model)
    logits, grads = _run(model, _batch(base_dtype), autocast=True)
    monkeypatch.setattr(leaf, "frozen_factor_product", _eager_frozen_factor_product)
    monkeypatch.setattr(hut_layer, "hadamard_linear", _eager_hadamard_linear)
    ref_logits, ref_grads = _run(reference, _batch(base_dtype), autocast=True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-2, atol=1e-3)
    for name, grad in grads.items():
        ref = ref_grads[name]
        assert (grad - ref).norm() <= 2e-2 * ref.norm(), name


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_autocast_runs_every_matmul_in_bf16_without_fp32_activation_copies(method, base_dtype):
    model = _model(method, base_dtype)
    batch = _batch(base_dtype)
    log = DispatchLog()
    with log:
        _run(model, batch, autocast=True)
    # every matmul over the tokens runs in bf16; weight-sized products without a token dimension are exempt
    # (HUT forms M = 1 + sBA in fp32 on purpose: in bf16, 1 + a small update rounds back to 1)
    over_tokens = [(name, dtypes) for name, dtypes, shapes in log.matmuls if any(TOKENS in s for s in shapes)]
    assert len(over_tokens) >= 6  # at least the base GEMMs' forward and backward
    not_bf16 = [(name, dtypes) for name, dtypes in over_tokens if set(dtypes) != {torch.bfloat16}]
    assert not not_bf16, not_bf16
    # an fp32 copy of a bf16 tensor shaped like activations (leading dim = tokens, last dim > 2 = not logits)
    upcasts = [
        shape
        for src, dst, shape in log.casts
        if src == torch.bfloat16 and dst == torch.float32 and shape and shape[0] == TOKENS and shape[-1] > 2
    ]
    assert not upcasts, upcasts


@pytest.mark.parametrize("method", METHODS)
def test_fp32_without_autocast_stays_fp32(method):
    model = _model(method, torch.float32)
    log = DispatchLog()
    with log:
        _run(model, _batch(torch.float32), autocast=False)
    assert {d for _, dtypes, _ in log.matmuls for d in dtypes} == {torch.float32}
    assert not [c for c in log.casts if c[0].is_floating_point and c[1] != torch.float32]


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_trainer_bf16_trains(method, base_dtype, tmp_path):
    case = MODEL_CASES["llama"]
    model = get_peft_model(case.model().to(base_dtype), METHOD_CASES[method].make_config(case.targets))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lr = METHOD_CASES[method].trainer_lr
    trainer = tiny_lm_trainer(model, str(tmp_path), lr, steps=3, batch_size=4, bf16=True)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(before[n], p) for n, p in after.items())
    base = [p for n, p in model.named_parameters() if "base_layer" in n]
    assert base and all(p.dtype == base_dtype and not p.requires_grad for p in base)


@pytest.mark.parametrize("method", METHODS)
def test_autocast_on_a_4bit_base(method):
    """QLoRA-style: bitsandbytes nf4 base, fp32 adapter, bf16 autocast; against the same model in fp32."""
    from test_conformance import _quantize_mlp_layer

    case = MODEL_CASES["mlp"]
    base = case.model()
    base.lin0 = _quantize_mlp_layer(base.lin0, 4)
    base.lin1 = _quantize_mlp_layer(base.lin1, 4)
    torch.manual_seed(0)
    model = get_peft_model(base, METHOD_CASES[method].make_config(case.targets, init_weights=False))
    model.train()
    ref_logits, ref_grads = _run(model, _batch(torch.float32), autocast=False)
    logits, grads = _run(model, _batch(torch.float32), autocast=True)
    torch.testing.assert_close(logits, ref_logits, rtol=5e-2, atol=5e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert (grad - ref_grads[name]).norm() <= 0.15 * ref_grads[name].norm(), name
