"""Fast checks of the causal-LM job on a tiny random Llama with SmolLM2's real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ortho_adapters import data
from ortho_adapters.cli import parse_finetune_args
from ortho_adapters.jobs.args import SMOLLM2_TARGETS, FinetuneArgs, resolve
from ortho_adapters.jobs.finetune import causal_lm_arms, to_argv
from ortho_adapters.jobs.lm_tasks import RT_CHOICES, LMExample, chat_prompt, format_example, get_task
from ortho_adapters.jobs.scoring import (
    IGNORE_INDEX,
    LeftPadCollator,
    choice_accuracy,
    encode,
    exact_match,
    generate_answers,
    score_choices,
    training_features,
)


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[LMExample]:
    task = get_task("social_iqa")
    rows = [
        {
            "input": "Kai lent Sam a pen. What will Sam do next?",
            "choices": ["Write", "Say thanks"],
            "answer": 1,
        },
        {"input": "Jo missed the bus.", "choices": ["Walk to work", "Sleep", "Run"], "answer": 0},
        {
            "input": "A much longer situation " * 5 + "and a question?",
            "choices": ["Yes", "No", "x"],
            "answer": 2,
        },
    ]
    return [format_example(tokenizer, task, r, max_length=256) for r in rows]


def _reference_logprob(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Token by token: log p(a_t | prompt, a_<t) from a fresh unpadded forward for each token."""
    total = 0.0
    context = list(prompt_ids)
    for token in answer_ids:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context])).logits[0, -1]
        total += torch.log_softmax(logits.double(), -1)[token].item()
        context.append(token)
    return total


def test_scores_equal_a_token_by_token_computation(model, tokenizer, examples):
    scores = score_choices(model, tokenizer, examples, batch_size=4)
    for ex, row in zip(examples, scores):
        for choice, value in zip(ex.choices, row):
            expected = _reference_logprob(model, *encode(tokenizer, ex.prompt, choice))
            assert value == pytest.approx(expected, abs=2e-4)


def test_scores_do_not_depend_on_batching_or_padding(model, tokenizer, examples):
    batched = score_choices(model, tokenizer, examples, batch_size=16)
    single = [score_choices(model, tokenizer, [ex], batch_size=1)[0] for ex in examples]
    assert [len(row) for row in batched] == [len(ex.choices) for ex in examples]
    for a, b in zip(batched, single):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


def test_choice_accuracy_takes_the_argmax():
    exs = [LMExample("p", ("a", "b"), 1), LMExample("p", ("a", "b", "c"), 0)]
    assert choice_accuracy([[0.0, -1.0], [-0.1, -2.0, -3.0]], exs) == 0.5


def test_labels_mask_the_prompt(tokenizer, examples):
    ex = examples[0]
    feats = training_features(tokenizer, ex)
    prompt_ids, answer_ids = encode(tokenizer, ex.prompt, ex.target)
    assert feats["input_ids"] == prompt_ids + answer_ids
    assert feats["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer_ids[:-1]) == ex.target


def test_collated_loss_equals_full_logit_loss(model, tokenizer, examples):
    """Left padding + logits_to_keep + cut labels give the model's loss over full logits, unpadded."""
    rows = [training_features(tokenizer, ex) for ex in examples]
    batch = LeftPadCollator(tokenizer.pad_token_id)(rows)
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]
    with torch.no_grad():
        loss = model(**batch).loss
        nll, count = 0.0, 0
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            keep = labels != IGNORE_INDEX
            nll += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert loss.item() == pytest.approx(nll / count, abs=1e-4)


def _greedy_reference(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_generation_matches_a_greedy_loop_and_exact_match_scores_it(model, tokenizer):
    task = get_task("arithmetic")
    rows = [
        {"input": f"What is {a} plus {b}?", "choices": [str(a + b)], "answer": 0}
        for a, b in [(1, 2), (40, 300)]
    ]
    prompts = [format_example(tokenizer, task, r, 128).prompt for r in rows]
    assert "Options" not in prompts[0]
    replies = generate_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    expected = [_greedy_reference(model, tokenizer, p, 4) for p in prompts]
    assert replies == expected
    assert exact_match(replies, expected) == 1.0
    assert exact_match([expected[0], "not it"], [expected[0], expected[1]]) == 0.5


def test_exact_match_normalizes_whitespace_and_a_final_period():
    assert exact_match([" 42.", "42", "4 2", "420"], ["42", "42 ", "42", "42"]) == 0.5


def test_prompt_format_and_truncation(tokenizer, examples):
    assert "Options:\n- Write\n- Say thanks\n\nAnswer with one of the options only." in examples[0].prompt
    task = get_task("rotten_tomatoes")
    ex = format_example(
        tokenizer, task, {"input": "Review: " + "great " * 400, "choices": RT_CHOICES, "answer": 1}, 96
    )
    assert ex.prompt.startswith("<|im_start|>system") and ex.prompt.endswith("<|im_start|>assistant\n")
    assert "positive or negative?" in ex.prompt and "Options" not in ex.prompt and " ... " in ex.prompt
    prompt_ids, answer_ids = encode(tokenizer, ex.prompt, ex.target)
    assert len(prompt_ids) + len(answer_ids) <= 96
    assert chat_prompt(tokenizer, "hi").endswith("<|im_start|>assistant\n")


def test_cli_parses_the_causal_lm_flags():
    args = parse_finetune_args(
        ["--model", "smollm2", "--task", "social_iqa", "--quantize", "4bit", "--gradient-checkpointing",
         "--n-train", "32", "--compare", "zeroshot,lora", "--max-length", "128"]
    )  # fmt: skip
    assert (args.model, args.dataset, args.quantize, args.gradient_checkpointing) == (
        "smollm2",
        "social_iqa",
        "4bit",
        True,
    )
    resolved = resolve(args)
    assert resolved.targets == SMOLLM2_TARGETS and resolved.n_train == 32 and resolved.max_length == 128
    assert resolved.epochs == 1.0 and resolved.batch_size == 8
    assert causal_lm_arms(resolved) == ["zeroshot", "lora_sb", "lora"]
    assert parse_finetune_args(to_argv(resolved)) == resolved  # what each arm's subprocess receives
    plain = resolve(parse_finetune_args(["--model", "smollm2", "--no-progress", "--compare", "none"]))
    assert parse_finetune_args(to_argv(plain)) == plain


def test_cli_defaults_stay_the_minilm_job():
    resolved = resolve(parse_finetune_args([]))
    assert (resolved.model, resolved.method, resolved.n_train, resolved.epochs) == (
        "minilm",
        "lora_sb",
        2000,
        2.0,
    )
    assert resolved.targets == ["query", "value", "output.dense"] and resolved.compare == ["baseline", "lora"]
    assert resolved.quantize is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": "gpt9"}, "unknown model"),
        ({"model": "smollm2", "dataset": "squad"}, "unknown task"),
        ({"dataset": "social_iqa"}, "unknown task"),
        ({"quantize": "4bit"}, "causal-LM job"),
    ],
)
def test_bad_combinations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve(FinetuneArgs(**kwargs))


def test_held_out_rows_are_seeded_and_independent_of_n_train():
    from ortho_adapters.jobs.lm_tasks import load_rows

    train_a, test_a = load_rows("quartz", 10, 20, seed=0)
    train_b, test_b = load_rows("quartz", 50, 20, seed=0)
    assert test_a == test_b and train_b[:10] == train_a and len(train_b) == 50
    assert not {r["input"] for r in test_a} & {r["input"] for r in train_b}
    assert load_rows("quartz", 10, 20, seed=1)[1] != test_a


def test_results_round_trip_as_strict_json(tmp_path):
    import json

    from ortho_adapters.jobs.report import RunResult, format_lm_table, write_results

    row = RunResult(
        "zeroshot", 0.5, 0, train_seconds=0.0, eval_seconds=3.0, peak_rss_mb=10.0, extra={"r": None}
    )
    write_results(tmp_path, format_lm_table([row]), {"model": "smollm2"}, [row])
    back = RunResult.from_dict(json.loads((tmp_path / "results.json").read_text())["rows"][0])
    assert back.wall_seconds == 3.0 and back.extra == row.extra
    assert "| zeroshot | - | - | - | 0.5000 | 0 |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("method", ["lora_sb", "loldu", "hut"])
def test_train_arm_runs_trainer_with_checkpointing(tokenizer, examples, method, tmp_path):
    """Init (LoRA-SB: gradient pass) + Trainer with non-reentrant checkpointing on the tiny Llama."""
    from ortho_adapters.jobs.causal_lm import evaluate, train_arm

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    args = resolve(
        FinetuneArgs(
            model="smollm2", method=method, dataset="social_iqa", r=4 if method != "loldu" else None,
            n_train=6, batch_size=3, init_samples=3, gradient_checkpointing=True, progress=False,
            output_dir=str(tmp_path),
        )
    )  # fmt: skip
    model, info = train_arm(LlamaForCausalLM(cfg), tokenizer, method, examples * 2, args)
    assert info["steps"] == 2 and np.isfinite(info["train_loss"])
    assert hasattr(model.base_model.model.model.layers[0].self_attn.q_proj, "base_layer")  # adapted
    assert 0.0 <= evaluate(model, tokenizer, "social_iqa", examples, args) <= 1.0


def test_items_whose_options_do_not_fit_are_dropped_with_a_warning():
    from ortho_adapters import data
    from ortho_adapters.jobs.lm_tasks import FrameTooLongError, _format_all, get_task

    tokenizer = data.load_smollm2_tokenizer()
    task = get_task("social_iqa")
    short = {"input": "Sam cooked. Why?", "choices": ["hungry", "bored", "to eat"], "answer": 0}
    huge = {"input": "Why?", "choices": ["word " * 120, "b", "c"], "answer": 1}
    with pytest.warns(UserWarning, match="dropped 1 of 2 items"):
        kept = _format_all(tokenizer, task, [short, huge], max_length=96)
    assert [e.choices for e in kept] == [("hungry", "bored", "to eat")]
    with pytest.raises(FrameTooLongError, match="max_length=96 is too short for social_iqa"):
        _format_all(tokenizer, task, [huge], max_length=96)
