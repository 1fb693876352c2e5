"""The adapter methods the jobs and benchmarks know, with their tuned defaults per model family.

Each entry builds a PEFT config for given target modules, rank and extra trainable modules (the
classifier head of the encoder job). PEFT's own methods (LoRA, VeRA, HiRA, TinyLoRA) are listed as
comparison arms. ``zeroshot`` (no training) is an arm of the causal-LM job, not a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import peft

import ortho_adapters

ZEROSHOT = "zeroshot"
ENCODER, CAUSAL_LM = "encoder", "causal_lm"


@dataclass(frozen=True)
class MethodSpec:
    """How to build one method's config, and the rank / learning rate it trains best with here.

    ``r`` / ``lr`` are the encoder (MiniLM) defaults; ``lm_r`` / ``lm_lr`` those of the causal-LM job
    (``lm_r=None`` with ``lm_r_is_set=False`` means "same as ``r``").
    """

    name: str
    paper: str
    build: Callable[[list[str], Optional[int], Optional[list[str]]], Any]
    lr: float
    r: Optional[int]
    gradient_init: bool = False
    lm_lr: Optional[float] = None
    lm_r: Optional[int] = None
    lm_r_is_set: bool = False

    def defaults(self, family: str) -> tuple[Optional[int], float]:
        """``(r, lr)`` for a model family (:data:`ENCODER` or :data:`CAUSAL_LM`)."""
        if family == CAUSAL_LM:
            r = self.lm_r if self.lm_r_is_set else self.r
            return r, self.lm_lr if self.lm_lr is not None else self.lr
        return self.r, self.lr


def _lora(targets, r, save):
    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=save)


def _lora_xs(targets, r, save):
    return ortho_adapters.LoraSBConfig(r=r, target_modules=targets, modules_to_save=save, init="svd")


def _lora_sb(targets, r, save):
    return ortho_adapters.LoraSBConfig(r=r, target_modules=targets, modules_to_save=save, init="gradient")


def _loldu(targets, r, save):
    # r=None: full rank per layer where LoLDUConfig supports it, else the largest rank every target allows
    if r is None and not getattr(ortho_adapters.LoLDUConfig, "FULL_RANK_WHEN_NONE", False):
        raise ValueError("this LoLDUConfig needs an explicit rank: pass --r")
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
        "lora_sb", "LoRA-SB (arXiv 2411.19557)", _lora_sb, lr=5e-3, r=16, gradient_init=True, lm_lr=2e-3
    ),
    "lora_xs": MethodSpec("lora_xs", "LoRA-XS (arXiv 2405.17604)", _lora_xs, lr=5e-3, r=16, lm_lr=2e-3),
    "lora": MethodSpec("lora", "PEFT LoRA (arXiv 2106.09685)", _lora, lr=1e-3, r=8),
    # causal LM: r=None is LoLDU's full rank per layer (k/v of SmolLM2 are 192 wide, the rest 576)
    "loldu": MethodSpec(
        "loldu", "LoLDU (arXiv 2410.13618)", _loldu, lr=2e-1, r=384, lm_lr=1e-1, lm_r=None, lm_r_is_set=True
    ),
    "hut": MethodSpec("hut", "HUT (arXiv 2409.13501)", _hut, lr=3e-2, r=8, lm_lr=1e-2),
    "vera": MethodSpec("vera", "PEFT VeRA (arXiv 2310.11454)", _vera, lr=1e-2, r=256),
    # TinyLoRA: frozen rank-2 SVD, `r` is its trainable vector length u per matrix (no weight tying)
    "tinylora": MethodSpec("tinylora", "PEFT TinyLoRA (arXiv 2602.04118)", _tinylora, lr=1e-2, r=64),
    # HiRA (W0 + W0 ⊙ BA) computes the same function as HUT here: same learning rate
    "hira": MethodSpec("hira", "PEFT HiRA (ICLR 2025)", _hira, lr=3e-2, r=8, lm_lr=1e-2),
}


def get_method(name: str) -> MethodSpec:
    """Look up a method by name, with a clear error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def gradient_init(
    model: Any,
    dataloader: Any,
    config: Any,
    num_samples: int,
    learning_rate: float,
    warmup_steps: int,
    progress: bool = True,
    svd: str = "auto",
) -> dict[str, Any]:
    """LoRA-SB's gradient init, ``eta = learning_rate / max(warmup_steps, 1)`` (the official code's choice).

    Returns ``eta`` and the mean loss of the init batches before / after installing the factors.
    """
    result = ortho_adapters.initialize_lora_sb(
        model,
        dataloader,
        config=config,
        num_samples=num_samples,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        progress=progress,
        svd=svd,
    )
    return {
        "init_step_size": result.step_size,
        "init_loss_before": result.loss_before,
        "init_loss_after": result.loss_after,
        "init_svd": svd,
        "init_samples": result.samples,
    }
