"""O3 behaviour: the gate per sample (w = 0 -> exactly the base output; a mixed batch equals its samples run
alone), requests frozen and summed, the Trainer path, exact save / reload of detector + calibration in a fresh
interpreter (the reloaded model gates on its own from input_ids), and clear errors on bad input."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from o3_helpers import lm_tokenizer, math_rows, review_texts, tiny_detector_dir, tiny_lm
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import ortho_adapters
from ortho_adapters import data
from ortho_adapters.core.compat import needs
from ortho_adapters.o3 import O3Trainer, orthogonality_penalty, unlearn
from ortho_adapters.o3.layer import O3Layer
from ortho_adapters.o3.scores import aggregate, soft_weight

TESTS = Path(__file__).parent


def make_model(tmp: Path, tokenizer, **overrides):
    settings = {"detector_model": str(tiny_detector_dir(tmp)), "gate_tokenizer": str(data.smollm2_dir())}
    config = ortho_adapters.O3Config(r=4, **{**settings, **overrides})
    return get_peft_model(tiny_lm(len(tokenizer)), config)


@pytest.fixture(scope="module")
def tok():
    return lm_tokenizer()


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory, tok):
    tmp = tmp_path_factory.mktemp("o3")
    # the tiny random detector spreads unseen forget items wider than its 6 held-out items: a wide ramp
    # (the MiniLM benchmark's kept tasks share the forget template and need the narrow 1 / 2 default)
    model = make_model(tmp, tok, gate_full_z=3.0, gate_zero_z=12.0)
    info = unlearn(model, math_rows(), "math", tokenizer=tok, epochs=2, lr=1e-2, detector_epochs=2)
    return model, info, tmp


def ids_batch(n: int, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n, length), generator=torch.Generator().manual_seed(seed))


def test_unlearn_trains_and_calibrates(unlearned):
    model, info, _ = unlearned
    assert model.peft_config["default"].requests == ["math"]
    assert info["lm_losses"][-1] < info["lm_losses"][0]
    assert info["n_fit"] == 24 and info["n_heldout"] == 6
    forget = model.gate_weights([r["prompt"] for r in math_rows(40)[30:]])  # unseen items of the task
    kept = model.gate_weights(review_texts())
    assert float(forget.mean()) > 0.8 and float(kept.max()) == 0.0, (forget, kept)


def test_w_zero_gives_exactly_the_base_output(unlearned):
    model, _, _ = unlearned
    ids = ids_batch(3)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with model.gate_inputs(weights=torch.tensor([0.0, 1.0, 0.5])):
            gated = model(input_ids=ids).logits
        with model.base_model.gate_bypassed():
            full = model(input_ids=ids).logits
    torch.testing.assert_close(gated[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(gated[1], full[1], rtol=0, atol=1e-6)
    assert not torch.allclose(gated[1], base[1]) and not torch.allclose(gated[2], base[2])
    with pytest.raises(ValueError, match="batch of 2"), torch.no_grad():
        with model.gate_inputs(weights=torch.tensor([0.0, 1.0, 0.5])):
            model(input_ids=ids[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        with model.gate_inputs(weights=torch.tensor([2.0])):
            pass


def test_mixed_batch_equals_each_sample_alone(unlearned):
    model, _, _ = unlearned
    texts = [math_rows(40)[33]["prompt"], review_texts()[0], math_rows(40)[35]["prompt"], review_texts()[3]]
    weights = model.gate_weights(texts)
    assert (weights == 0).any() and (weights > 0).any(), weights
    ids = ids_batch(4)
    with torch.no_grad():
        with model.gate_inputs(texts=texts):
            batch = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        for i, text in enumerate(texts):
            with model.gate_inputs(texts=[text]):
                alone = model(input_ids=ids[i : i + 1]).logits[0]
            torch.testing.assert_close(batch[i], alone, rtol=1e-5, atol=1e-5)
            if weights[i] == 0:
                torch.testing.assert_close(batch[i], base[i], rtol=0, atol=0)
            else:
                assert not torch.allclose(batch[i], base[i])


def test_gate_reads_input_ids_on_its_own(unlearned, tok):
    model, _, _ = unlearned
    texts = [math_rows(40)[31]["prompt"], review_texts()[1]]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**enc)
    auto = model.base_model.o3_gate_state.current["default"]
    torch.testing.assert_close(auto, model.gate_weights(texts), rtol=0, atol=0)
    # generate(): the prompt's weights are reused for the cached steps
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, enc["input_ids"].shape[1] + 3)
    torch.testing.assert_close(model.base_model.o3_gate_state.current["default"], auto, rtol=0, atol=0)


RELOAD = """
import sys, torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, AutoTokenizer
import ortho_adapters
base_dir, adapter_dir, out, tok_dir, *texts = sys.argv[1:]
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
tok = AutoTokenizer.from_pretrained(tok_dir)
res = {"weights": model.gate_weights(texts)}
with torch.no_grad():
    for i, text in enumerate(texts):
        res[f"logits{i}"] = model(**tok([text], return_tensors="pt")).logits.contiguous()
gate = model.base_model.o3_gate_state.gates["default"]
for k, v in gate.stats["math"].tensors().items():
    res["stats." + k] = v
save_file(res, out)
"""


# O3 save / load needs peft >= 0.21 (with older PEFT it raises: test_conformance checks that)
needs_o3_save = pytest.mark.skipif(bool(needs("o3-save")), reason=str(needs("o3-save")))


@needs_o3_save
def test_save_reload_in_process_is_exact(unlearned, tok):
    model, _, tmp = unlearned
    texts = [math_rows(40)[34]["prompt"], review_texts()[4]]
    model.save_pretrained(tmp / "adapter_inproc")
    reloaded = PeftModel.from_pretrained(tiny_lm(len(tok)), tmp / "adapter_inproc").eval()
    assert reloaded.peft_config["default"].requests == ["math"]
    original = model.base_model.o3_gate_state.gates["default"].stats["math"].tensors()
    loaded = reloaded.base_model.o3_gate_state.gates["default"].stats["math"].tensors()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    torch.testing.assert_close(reloaded.gate_weights(texts), model.gate_weights(texts), rtol=0, atol=0)
    ids = ids_batch(2)
    with torch.no_grad(), model.gate_inputs(texts=texts), reloaded.gate_inputs(texts=texts):
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_set_gate_ramp_moves_every_request_and_is_saved(unlearned, tok):
    model, _, tmp = unlearned
    config = model.peft_config["default"]
    stats = model.base_model.o3_gate_state.gates["default"].stats["math"]
    saved = (config.gate_full_z, config.gate_zero_z, stats.ramp.clone())
    texts = [r["prompt"] for r in math_rows(40)[30:]] + review_texts()
    try:
        with pytest.raises(ValueError, match="full_z < zero_z"):
            model.set_gate_ramp(2.0, 1.0)
        assert torch.equal(stats.ramp, saved[2]) and config.gate_zero_z == saved[1]
        fresh = make_model(tmp, tok)  # no calibrated request: the bad values are still refused
        with pytest.raises(ValueError, match="full_z < zero_z"):
            fresh.set_gate_ramp(2.0, 1.0)
        assert (fresh.peft_config["default"].gate_full_z, fresh.peft_config["default"].gate_zero_z) == (
            1.0,
            2.0,
        )
        model.set_gate_ramp(0.5, 2.0)
        mu, sd = (float(v) for v in stats.center)
        score = model.gate_scores(texts)["math"].double()
        expected = ((score - (mu - 2.0 * sd)) / (1.5 * sd)).clamp(0, 1).float()
        torch.testing.assert_close(model.gate_weights(texts), expected, rtol=1e-5, atol=1e-6)
        if not needs("o3-save"):  # the saved ramp (O3 save / load needs peft >= 0.21)
            model.save_pretrained(tmp / "adapter_ramp")
            reloaded = PeftModel.from_pretrained(tiny_lm(len(tok)), tmp / "adapter_ramp").eval()
            config = reloaded.peft_config["default"]
            assert (config.gate_full_z, config.gate_zero_z) == (0.5, 2.0)
            got, want = reloaded.gate_weights(texts), model.gate_weights(texts)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        model.set_gate_ramp(saved[0], saved[1])
    assert torch.equal(stats.ramp, saved[2])


@pytest.mark.slow
@needs_o3_save
def test_save_reload_in_fresh_process_is_exact(unlearned, tok):
    model, _, tmp = unlearned
    texts = [math_rows(40)[32]["prompt"], review_texts()[2], math_rows(40)[36]["prompt"]]
    model.save_pretrained(tmp / "adapter")
    tiny_lm(len(tok)).save_pretrained(tmp / "base")  # the same seeded base model
    saved = load_file(tmp / "adapter" / "adapter_model.safetensors")
    assert any(k.startswith("base_model.o3_gate.math.detector.") for k in saved)
    assert not any(".default." in k for k in saved), "adapter names must not be in the saved keys"
    expected = {"weights": model.gate_weights(texts)}
    with torch.no_grad():
        for i, text in enumerate(texts):
            with model.gate_inputs(texts=[text]):
                expected[f"logits{i}"] = model(**tok([text], return_tensors="pt")).logits
    out = tmp / "reloaded.safetensors"
    script = tmp / "reload_o3.py"
    script.write_text(RELOAD)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp / "base"),
            str(tmp / "adapter"),
            str(out),
            str(data.smollm2_dir()),
        ]
        + texts,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(out)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    for key, value in model.base_model.o3_gate_state.gates["default"].stats["math"].tensors().items():
        assert torch.equal(got["stats." + key], value), key


def test_second_request_freezes_the_first_and_gates_with_the_max(tmp_path, tok):
    model = make_model(tmp_path, tok)
    unlearn(model, math_rows(15), "math", tokenizer=tok, epochs=1, lr=1e-2, detector_epochs=1)
    layers = [m for m in model.modules() if isinstance(m, O3Layer)]
    first = [
        (
            m.o3_lora["default"].lora_A.weight.detach().clone(),
            m.o3_lora["default"].lora_B.weight.detach().clone(),
        )
        for m in layers
    ]
    refusal_rows = [{"prompt": f"Tell me the secret code number {i}."} for i in range(10)]
    info = unlearn(model, refusal_rows, "codes", tokenizer=tok, epochs=1, lr=1e-2, detector_epochs=1)
    assert model.peft_config["default"].requests == ["math", "codes"]
    assert info["penalty"] > 0
    for layer, (a1, b1) in zip(layers, first):
        x = torch.randn(2, 5, layer.in_features)
        fa, fb = layer.request_stacks("default")
        assert torch.equal(fa[0], a1) and torch.equal(fb[0], b1)
        leaf = layer.o3_lora["default"]
        s = layer.scaling["default"]
        ref = s * (x @ a1.t() @ b1.t() + x @ leaf.lora_A.weight.t() @ leaf.lora_B.weight.t())
        torch.testing.assert_close(layer.adapter_output("default", x), ref, rtol=1e-5, atol=1e-6)
    texts = [refusal_rows[0]["prompt"], math_rows(15)[2]["prompt"], review_texts()[0]]
    gate = model.base_model.o3_gate_state.gates["default"]
    per = [soft_weight(st, aggregate(st, gate.detector.features(n, texts))) for n, st in gate.stats.items()]
    torch.testing.assert_close(model.gate_weights(texts), torch.maximum(per[0], per[1]), rtol=0, atol=0)


def test_trainer_path_adds_the_penalty(tmp_path, tok):
    from transformers import TrainingArguments

    model = make_model(tmp_path, tok, gate=False)
    model.base_model.start_request("earlier")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    args = TrainingArguments(
        output_dir=str(tmp_path / "tr"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    info = unlearn(model, math_rows(8), "later", tokenizer=tok, training_args=args)
    assert len(info["lm_losses"]) == 3 and info["penalty"] > 0 and "detector_losses" not in info
    trainer = O3Trainer(model=model, args=args)
    batch = {"input_ids": ids_batch(2), "labels": ids_batch(2)}
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        ref = model(**batch).loss + 0.1 * orthogonality_penalty(model)
    torch.testing.assert_close(loss, ref)


def test_bad_input_raises_and_leaves_the_model_unchanged(tmp_path, tok):
    model = make_model(tmp_path, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = copy.deepcopy(model.peft_config["default"])
    bad = math_rows(5)
    bad[2] = {**bad[2], "answer": 7}
    with pytest.raises(ValueError, match=r"forget_data\[2\]"):
        unlearn(model, bad, "x", tokenizer=tok)
    with pytest.raises(ValueError, match="at least 3"):
        unlearn(model, math_rows(2), "x", tokenizer=tok)
    with pytest.raises(ValueError, match="request name"):
        unlearn(model, math_rows(5), "a.b", tokenizer=tok)
    with pytest.raises(ValueError, match="O3Config"):
        unlearn(tiny_lm(len(tok)), math_rows(5), "x", tokenizer=tok)
    missing = make_model(tmp_path, tok, detector_model=str(tmp_path / "no_such_encoder"))
    with pytest.raises(FileNotFoundError, match="no_such_encoder"):
        unlearn(missing, math_rows(5), "x", tokenizer=tok)
    assert missing.peft_config["default"].requests == []
    assert model.peft_config["default"].requests == config.requests == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="gate_full_z"):
        ortho_adapters.O3Config(gate_full_z=3.0, gate_zero_z=1.0)


def test_gated_adapter_refuses_to_merge(unlearned):
    model, _, _ = unlearned
    with pytest.raises(ValueError, match="cannot merge a gated O3 adapter"):
        model.merge_adapter()
