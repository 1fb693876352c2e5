"""The adapter methods the CLI and benchmarks know, with their tuned defaults.

Each entry builds a PEFT config for given target modules, rank and extra trainable modules (the
classifier head). PEFT's own methods (LoRA, VeRA, HiRA, TinyLoRA) are listed as comparison arms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import peft

import ortho_adapters


@dataclass(frozen=True)
class MethodSpec:
    """How to build one method's config, and the learning rate / rank it trains best with here."""

    name: str
    paper: str
    build: Callable[[list[str], int, Optional[list[str]]], Any]
    lr: float
    r: int
    gradient_init: bool = False


def _lora(targets, r, save):
    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=save)


def _lora_xs(targets, r, save):
    return ortho_adapters.LoraSBConfig(r=r, target_modules=targets, modules_to_save=save, init="svd")


def _lora_sb(targets, r, save):
    return ortho_adapters.LoraSBConfig(r=r, target_modules=targets, modules_to_save=save, init="gradient")


def _loldu(targets, r, save):
    return ortho_adapters.LoLDUConfig(r=r, target_modules=targets, modules_to_save=save)


def _hut(targets, r, save):
    return ortho_adapters.HUTConfig(r=r, target_modules=targets, modules_to_save=save)


def _vera(targets, r, save):
    return peft.VeraConfig(r=r, target_modules=targets, modules_to_save=save)


def _tinylora(targets, r, save):
    return peft.TinyLoraConfig(r=2, u=r, weight_tying=0.0, target_modules=targets, modules_to_save=save)


def _hira(targets, r, save):
    return peft.HiraConfig(r=r, target_modules=targets, modules_to_save=save)


METHODS: dict[str, MethodSpec] = {
    "lora_sb": MethodSpec(
        "lora_sb", "LoRA-SB (arXiv 2411.19557)", _lora_sb, lr=5e-3, r=16, gradient_init=True
    ),
    "lora_xs": MethodSpec("lora_xs", "LoRA-XS (arXiv 2405.17604)", _lora_xs, lr=5e-3, r=16),
    "lora": MethodSpec("lora", "PEFT LoRA (arXiv 2106.09685)", _lora, lr=1e-3, r=8),
    "loldu": MethodSpec("loldu", "LoLDU (arXiv 2410.13618)", _loldu, lr=2e-1, r=384),
    "hut": MethodSpec("hut", "HUT (arXiv 2409.13501)", _hut, lr=3e-2, r=8),
    "vera": MethodSpec("vera", "PEFT VeRA (arXiv 2310.11454)", _vera, lr=1e-2, r=256),
    # TinyLoRA: frozen rank-2 SVD, `r` is its trainable vector length u per matrix (no weight tying)
    "tinylora": MethodSpec("tinylora", "PEFT TinyLoRA (arXiv 2602.04118)", _tinylora, lr=1e-2, r=64),
    # HiRA (W0 + W0 ⊙ BA) computes the same function as HUT here: same learning rate
    "hira": MethodSpec("hira", "PEFT HiRA (ICLR 2025)", _hira, lr=3e-2, r=8),
}


def get_method(name: str) -> MethodSpec:
    """Look up a method by name, with a clear error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
