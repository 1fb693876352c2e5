"""The methods under the conformance battery: a new method joins by adding one ``MethodCase``.

``make_config(targets, **overrides)`` builds a config; ``trainable(shapes, config)`` is the exact
number of adapter values the method trains for the adapted ``(out, in)`` shapes, as its paper defines it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ortho_adapters


@dataclass(frozen=True)
class MethodCase:
    name: str
    make_config: Callable[..., Any]
    trainable: Callable[[list[tuple[int, int]], Any], int]
    starts_at_base: bool = True
    trainer_lr: float = 5e-2  # learning rate at which a few Trainer steps visibly lower a tiny LM's loss


METHOD_CASES: dict[str, MethodCase] = {
    "lora_sb": MethodCase(
        "lora_sb",
        lambda targets, **kw: ortho_adapters.LoraSBConfig(target_modules=list(targets), **{"r": 4, **kw}),
        lambda shapes, cfg: len(shapes) * cfg.r * cfg.r,
        trainer_lr=1.0,  # B = U S of a small random init: tiny singular values need a large step
    ),
    "hut": MethodCase(
        "hut",
        lambda targets, **kw: ortho_adapters.HUTConfig(target_modules=list(targets), **{"r": 4, **kw}),
        lambda shapes, cfg: sum(cfg.r * (m + n) for m, n in shapes),
        trainer_lr=0.3,  # M = 1 + sBA scales tiny (std 0.02) weights: the factors need a large step
    ),
    "loldu": MethodCase(
        "loldu",
        lambda targets, **kw: ortho_adapters.LoLDUConfig(target_modules=list(targets), **{"r": 8, **kw}),
        lambda shapes, cfg: len(shapes) * (cfg.r + int(cfg.train_sigma)),
        trainer_lr=0.3,  # only r diagonal values per matrix (sigma = 1/r): r=8 and a large step move the loss
    ),
    "fedsvd": MethodCase(
        "fedsvd",
        lambda targets, **kw: ortho_adapters.FedSVDConfig(target_modules=list(targets), **{"r": 4, **kw}),
        lambda shapes, cfg: sum(m * cfg.r for m, _ in shapes),
        trainer_lr=0.3,  # only B trains (A frozen orthonormal): plain LoRA-B-sized steps
    ),
    "o3": MethodCase(
        "o3",
        lambda targets, **kw: ortho_adapters.O3Config(
            target_modules=list(targets), **{"r": 4, "gate": False, **kw}
        ),
        lambda shapes, cfg: sum(cfg.r * (m + n) for m, n in shapes),  # the current request's A and B
        trainer_lr=0.05,  # plain LoRA (B = 0 start)
    ),
    "ortho_lora_subspace": MethodCase(
        "ortho_lora_subspace",
        lambda targets, **kw: ortho_adapters.OrthoLoraConfig(
            target_modules=list(targets), **{"r": 4, "alpha": 4.0, **kw}
        ),
        lambda shapes, cfg: sum(m * cfg.r for m, _ in shapes),  # only the current task's B trains
        trainer_lr=0.3,  # frozen orthonormal A and s = 1, like FedSVD
    ),
    "ortho_lora_olora": MethodCase(
        "ortho_lora_olora",
        lambda targets, **kw: ortho_adapters.OrthoLoraConfig(
            target_modules=list(targets), **{"r": 4, "alpha": 4.0, "mode": "olora", **kw}
        ),
        lambda shapes, cfg: sum(cfg.r * (m + n) for m, n in shapes),  # the current task's A and B (LoRA)
        trainer_lr=1.0,  # alpha = r (s = 1) keeps the 4-bit re-quantization error of perturbed A, B small
    ),
}
