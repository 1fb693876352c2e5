"""Causal-LM training features and evaluation: answer-only labels, option log-likelihoods, generation.

Sequences are ``prompt + answer + <|im_end|>`` token ids (prompt and answer tokenized separately, so
every option is scored on the same prompt tokens). Batches are left-padded with explicit
``position_ids``; training passes ``logits_to_keep`` so that only the positions that predict answer
tokens go through the 49k-wide LM head. Scoring runs each prompt once and continues every option
from its KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..core.compat import output_cache
from .lm_tasks import LMExample

IGNORE_INDEX = -100


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)``; the answer ends with the end-of-turn token (``eos``)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def features(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> dict[str, list[int]]:
    """``input_ids`` = prompt + answer; ``labels`` = the answer tokens, -100 on the prompt."""
    return {
        "input_ids": list(prompt_ids) + list(answer_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids),
    }


def training_features(tokenizer: PreTrainedTokenizerBase, example: LMExample) -> dict[str, list[int]]:
    """Features of an example's correct answer, the loss on the answer tokens only."""
    return features(*encode(tokenizer, example.prompt, example.target))


def left_pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded, mask)``: ``rows`` left-padded with ``value`` to the longest; mask 1 on real tokens."""
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return padded, mask


@dataclass
class LeftPadCollator:
    """Left-pads ``input_ids`` / ``labels``; adds ``attention_mask``, ``position_ids`` and ``logits_to_keep``.

    ``logits_to_keep = k`` covers every labelled position of the batch (``labels`` are cut to the last
    ``k`` columns to match): the model's own shifted loss then equals the loss over full logits.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = left_pad([r["input_ids"] for r in rows], self.pad_token_id)
        labels, _ = left_pad([r["labels"] for r in rows], IGNORE_INDEX)
        labelled = (labels != IGNORE_INDEX).long()
        # columns from the first labelled one to the end, plus the one whose logits predict it
        first = torch.where(
            labelled.any(-1), labelled.argmax(-1), torch.full_like(labelled[:, 0], ids.shape[1])
        )
        keep = int(min(ids.shape[1] - int(first.min()) + 1, ids.shape[1]))
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels[:, ids.shape[1] - keep :],
            "logits_to_keep": keep,
        }


def _score_batch(
    model: nn.Module, prompts: Sequence[list[int]], answers: Sequence[Sequence[list[int]]], pad_token_id: int
) -> list[list[float]]:
    """Answer log-likelihoods of a batch: each prompt runs once, its answers continue from its KV cache."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each answer's first token
    owner = torch.tensor([i for i, opts in enumerate(answers) for _ in opts], device=device)
    flat = [a for opts in answers for a in opts]
    width = max(len(a) for a in flat)
    opt = torch.full((len(flat), width), pad_token_id, dtype=torch.long, device=device)
    opt_mask = torch.zeros((len(flat), width), dtype=torch.long, device=device)
    for k, a in enumerate(flat):  # right-padded: the pads come after the tokens that matter
        opt[k, : len(a)] = torch.as_tensor(a, device=device)
        opt_mask[k, : len(a)] = 1
    scores = first[owner].gather(-1, opt[:, :1]).squeeze(-1)
    if width > 1:
        keyword, cache = output_cache(out)  # ``cache`` in transformers >= 5.2x, ``past_key_values`` before
        cache.batch_select_indices(owner)
        rest = model(
            input_ids=opt[:, :-1],
            attention_mask=torch.cat([mask[owner], opt_mask[:, :-1]], dim=1),
            position_ids=mask.sum(-1)[owner, None] + torch.arange(width - 1, device=device),
            use_cache=False,
            **{keyword: cache},
        )
        logprobs = torch.log_softmax(rest.logits.float(), dim=-1)  # position t predicts answer token t + 1
        picked = logprobs.gather(-1, opt[:, 1:].unsqueeze(-1)).squeeze(-1)
        scores = scores + (picked * opt_mask[:, 1:]).sum(-1)
    values = scores.tolist()
    grouped, k = [], 0
    for opts in answers:
        grouped.append(values[k : k + len(opts)])
        k += len(opts)
    return grouped


@torch.no_grad()
def score_choices(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[LMExample],
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[float]]:
    """Log-likelihood of every choice of every example: ``sum_t log p(answer_t | prompt, answer_<t)``.

    The answer includes its end-of-turn token, so a choice that is a prefix of another is not favoured.
    Examples are batched longest prompt first (``batch_size`` prompts a batch); each prompt runs once
    and all its choices continue from its KV cache. Padding does not change the scores.
    """
    encoded = [
        (
            tokenizer(ex.prompt, add_special_tokens=False)["input_ids"],
            [encode(tokenizer, "", c)[1] for c in ex.choices],
        )
        for ex in examples
    ]
    order = sorted(range(len(examples)), key=lambda i: -len(encoded[i][0]))
    scores: list[list[float]] = [[] for _ in examples]
    was_training = model.training
    model.eval()
    with tqdm(total=len(examples), desc="scoring choices", unit="example", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = _score_batch(
                model, [encoded[i][0] for i in chunk], [encoded[i][1] for i in chunk], tokenizer.pad_token_id
            )
            for i, values in zip(chunk, batch):
                scores[i] = values
            bar.update(len(chunk))
    model.train(was_training)
    return scores


def choice_accuracy(scores: Sequence[Sequence[float]], examples: Sequence[LMExample]) -> float:
    """Fraction of examples whose highest-scored choice is the answer."""
    hits = [max(range(len(s)), key=s.__getitem__) == ex.answer for s, ex in zip(scores, examples)]
    return sum(hits) / max(len(hits), 1)


def normalize_answer(text: str) -> str:
    """Whitespace and a trailing period stripped (``" 42."`` -> ``"42"``)."""
    return text.strip().rstrip(".").strip()


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer after :func:`normalize_answer`."""
    hits = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    return sum(hits) / max(len(hits), 1)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy replies to ``prompts`` (left-padded batches), cut at the end-of-turn token."""
    device = next(model.parameters()).device
    replies: list[str] = [""] * len(prompts)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda k: -len(encoded[k]))
    was_training = model.training
    model.eval()
    with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = left_pad([encoded[k] for k in chunk], tokenizer.pad_token_id)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for k, row in zip(chunk, out[:, ids.shape[1] :]):
                replies[k] = tokenizer.decode(row, skip_special_tokens=True)
            bar.update(len(chunk))
    model.train(was_training)
    return replies
