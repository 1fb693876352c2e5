"""QLoRA on the CPU: bitsandbytes repacks a 4-bit weight for its inference kernel after an eval-mode
forward; training must still reach every layer and every weight read must see the true weights
(ortho_adapters.core.cpu_4bit)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conformance_cases import METHOD_CASES
from peft import get_peft_model
from tiny_models import VOCAB, tiny_lm_trainer, tiny_nf4_llama
from torch import nn

from ortho_adapters.core.compat import needs
from ortho_adapters.core.cpu_4bit import is_cpu_packed, remember_4bit_state, restore_4bit_layout
from ortho_adapters.core.layer import OrthoLayer

# transformers 4.51 refuses to load a bitsandbytes model on a CPU
versions = pytest.mark.skipif(bool(needs("4bit-cpu")), reason=str(needs("4bit-cpu")))

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16  # noqa: E402

pytestmark = [
    versions,
    pytest.mark.skipif(
        not has_avx512bf16(), reason="bitsandbytes packs 4-bit weights only on CPUs with AVX512-BF16"
    ),
]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _eval_forward(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_batch()["input_ids"]).logits


def _packed(model: nn.Module) -> int:
    return sum(is_cpu_packed(m) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def _train_step(model: nn.Module, lr: float) -> None:
    """One SGD step; every adapted layer must get a non-zero gradient (it reaches each layer's input)."""
    model.train()
    model.zero_grad()
    model(**_batch()).loss.backward()
    layers = [m for m in model.modules() if isinstance(m, OrthoLayer)]
    for layer in layers:
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient in {layer.module_name}"
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= lr * p.grad


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_training_after_eval_forwards_reaches_every_layer(method, tmp_path):
    model = tiny_nf4_llama(str(tmp_path))
    _eval_forward(model)  # a user looks at the outputs once: bitsandbytes packs every layer
    assert _packed(model) == 14
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the restore from the packed bf16 scales warns (tested below)
        peft_model = get_peft_model(model, METHOD_CASES[method].make_config(TARGETS))
        _train_step(peft_model, lr=METHOD_CASES[method].trainer_lr)
    first = _eval_forward(peft_model)  # a second evaluation packs again ...
    assert _packed(peft_model) == (0 if method == "hut" else 14)  # HUT's materialized W' never calls bnb
    _train_step(peft_model, lr=METHOD_CASES[method].trainer_lr)  # ... and training still reaches every layer
    second = _eval_forward(peft_model)
    assert (second - first).abs().max() > 1e-6  # the outputs still move (HUT's steps scale tiny weights)


def test_hut_starts_at_the_base_model_after_an_eval_forward(tmp_path):
    model = tiny_nf4_llama(str(tmp_path))
    reference = tiny_nf4_llama(str(tmp_path / "again"))  # the same weights, never packed
    batch = _batch()
    reference.train()
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"]).logits
    _eval_forward(model)
    peft_model = get_peft_model(model, METHOD_CASES["hut"].make_config(TARGETS))
    peft_model.train()
    with torch.no_grad():
        adapted = peft_model(input_ids=batch["input_ids"]).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(adapted, base, rtol=0, atol=1e-5)  # exactly the (restored) base model
    # packed before the adapters came, the block scales went through bf16 (2**-8): close to the original
    assert (adapted - expected).abs().max() < 0.05
    # attached before the first eval forward, every later restore is exact (FedSVD, B = 0: its forward calls
    # the base layer, which bitsandbytes packs; HUT's materialized W' never does)
    fresh = get_peft_model(
        tiny_nf4_llama(str(tmp_path / "third")), METHOD_CASES["fedsvd"].make_config(TARGETS)
    )
    _eval_forward(fresh)
    assert _packed(fresh) == 14
    fresh.train()  # a training forward (grad enabled) restores the usual layout, exactly
    torch.testing.assert_close(
        fresh(input_ids=batch["input_ids"]).logits.detach(), expected, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("nested", [False, True])
def test_restore_is_exact_with_the_remembered_state(nested):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 64, bias=False, compute_dtype=torch.float32, compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(64, 256) * 0.05, requires_grad=False, compress_statistics=nested
    )
    layer = layer.to("cpu")  # quantizes
    codes, weight = layer.weight.data.clone(), dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    remember_4bit_state(layer)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 256))
    assert is_cpu_packed(layer)
    assert restore_4bit_layout(layer) and not is_cpu_packed(layer)
    assert torch.equal(layer.weight.data, codes)
    assert torch.equal(dequantize_4bit(layer.weight.data, layer.weight.quant_state), weight)
    # without a remembered state: the scales come back from the bf16 copy, with a warning
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 256))
    delattr(layer, "_ortho_adapters_unpacked_quant_state")
    with pytest.warns(UserWarning, match="before an ortho_adapters adapter wrapped it"):
        restore_4bit_layout(layer)
    approx = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(layer.weight.data, codes)
    assert (approx - weight).abs().max() <= 2**-8 * weight.abs().max() + 1e-3 * nested


def test_trainer_loss_keeps_falling_after_each_evaluation(tmp_path):
    model = get_peft_model(tiny_nf4_llama(str(tmp_path / "m")), METHOD_CASES["fedsvd"].make_config(TARGETS))
    trainer = tiny_lm_trainer(
        model,
        str(tmp_path / "t"),
        lr=0.3,
        steps=12,
        batch_size=8,
        evaluate=True,
        eval_strategy="steps",
        eval_steps=3,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(losses) == 12 and len(evals) == 4
    assert _packed(model) == 14  # the last evaluation (step 12) ran bitsandbytes' fast inference kernel
    after_first_eval = losses[3:]  # the same 8 sequences every step: an untrained layer gives a flat loss
    assert all(b < a for a, b in zip(after_first_eval, after_first_eval[1:])), losses
    assert after_first_eval[-1] < after_first_eval[0] - 0.05, losses
