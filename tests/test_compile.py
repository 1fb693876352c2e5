"""``torch.compile(layer, fullgraph=True)`` on one adapted layer of every method: no graph break, one
compiled frame, and forward and every gradient equal to eager (fp32, and bf16 autocast on the CPU).

The fast tests use the ``aot_eager`` backend: Dynamo must capture the adapter's forward (custom autograd
functions included) as one graph and AOTAutograd trace its backward, which is where graph breaks and
untraceable code show up; the slow test runs the same checks through Inductor (C++ codegen, gcc).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import ortho_adapters

IN, OUT, R = 24, 20, 4


def _lora_sb_with_offset(layer: nn.Module) -> None:
    """Gradient-init style factors with ``subtract_init=True`` (the ``R - R0`` path), then move off R0."""
    g = torch.Generator().manual_seed(3)
    layer.set_factors(
        "default",
        torch.randn(OUT, R, generator=g),
        torch.randn(R, R, generator=g),
        torch.randn(R, IN, generator=g),
        subtract_init=True,
    )
    with torch.no_grad():
        layer.lora_sb_R["default"].weight.add_(0.1 * torch.randn(R, R, generator=g))


CASES = {
    "lora_sb": (lambda: ortho_adapters.LoraSBConfig(r=R, target_modules=["0"], init_weights=False), None),
    "lora_sb_offset": (
        lambda: ortho_adapters.LoraSBConfig(r=R, target_modules=["0"], init="gradient", inference_mode=True),
        _lora_sb_with_offset,
    ),
    "loldu": (lambda: ortho_adapters.LoLDUConfig(r=R, target_modules=["0"], init_weights=False), None),
    "loldu_sigma": (
        lambda: ortho_adapters.LoLDUConfig(r=R, target_modules=["0"], init_weights=False, train_sigma=True),
        None,
    ),
    **{
        f"hut_{mode}": (
            lambda mode=mode: ortho_adapters.HUTConfig(
                r=R, target_modules=["0"], execution=mode, init_weights=False
            ),
            None,
        )
        for mode in ("materialize", "factored", "auto")
    },
    "fedsvd": (lambda: ortho_adapters.FedSVDConfig(r=R, target_modules=["0"], init_weights=False), None),
}


def adapted_layer(case: str) -> nn.Module:
    """The tuner layer of a one-linear model with the method's adapter, non-trivial factors, training mode."""
    make_config, prepare = CASES[case]
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(IN, OUT)), make_config())
    layer = model.base_model.model[0]
    if prepare is not None:
        prepare(layer)
    for p in layer.parameters():  # inference_mode=True freezes: train the leaf as a user would
        p.requires_grad_(p in set(layer.trainable_modules.parameters()))
    return layer.train()


def run(fn, layer: nn.Module, x: torch.Tensor, autocast: bool):
    """Output and the gradients of ``x`` and every trainable tensor for ``sum(y * w)``."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x)
    weights = torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y.float() * weights).sum(), [x, *params])
    return y.detach(), grads


def check_compiled_matches_eager(case: str, backend: str, autocast: bool) -> None:
    torch._dynamo.reset()
    layer = adapted_layer(case)
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(1))
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    y_c, grads_c = run(compiled, layer, x, autocast)
    y_e, grads_e = run(layer, layer, x, autocast)
    assert counter.frame_count == 1, f"{case}: expected one compiled graph, got {counter.frame_count}"
    assert y_c.dtype == y_e.dtype
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_c, y_e, **tol)
    assert len(grads_c) >= 2
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, **tol)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_compile_matches_eager(case, autocast):
    check_compiled_matches_eager(case, "aot_eager", autocast)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_inductor_matches_eager(case):
    check_compiled_matches_eager(case, "inductor", autocast=False)
