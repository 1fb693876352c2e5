"""Tiny models for the O3 tests: a random BERT detector (MiniLM's tokenizer) and a tiny Llama with SmolLM2's
tokenizer, plus two synthetic "tasks" (arithmetic multiple choice to forget, movie reviews to keep)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_llama
from transformers import BertConfig, BertModel, LlamaForCausalLM

from ortho_adapters import data


def tiny_detector_dir(root: Path) -> Path:
    """Save a seeded 2-layer, 32-wide BERT with the MiniLM tokenizer under ``root/tinybert``."""
    out = root / "tinybert"
    if (out / "config.json").exists():
        return out
    tokenizer = data.load_minilm_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def lm_tokenizer():
    return data.load_smollm2_tokenizer()


def tiny_lm(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return tiny_llama(vocab_size, max_positions=256).eval()


def math_rows(n: int = 30) -> list[dict]:
    """Arithmetic multiple choice (the forget task)."""
    rows = []
    for a in range(3, 3 + n):
        b = a + 4
        rows.append(
            {
                "prompt": f"Question: what is {a} plus {b}?\nA. {a + b}\nB. {a + b + 1}\nC. {a * b}\nAnswer:",
                "choices": [" A", " B", " C"],
                "answer": 0,
            }
        )
    return rows


def review_texts(n: int = 20) -> list[str]:
    """Movie-review sentences (kept data, never seen by the gate)."""
    adj = ["great", "dull", "funny", "slow", "bright", "long", "warm"]
    cast = ["wooden", "superb", "fine", "tired", "charming"]
    verb = ["surely", "never", "maybe", "gladly", "not", "happily"]
    return [
        f"The film was {adj[i % 7]} and the actors were {cast[i % 5]}; I would {verb[i % 6]} watch it again."
        for i in range(n)
    ]
