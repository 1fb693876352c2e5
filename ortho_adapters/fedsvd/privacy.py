"""Client-side differential privacy with Opacus (DP-SGD) and ONE accountant per client for the whole run.

Each client trains with per-sample gradient clipping (``max_grad_norm``) and Gaussian noise of standard
deviation ``noise_multiplier * max_grad_norm`` on Poisson-sampled batches (``sample_rate = batch / n_k``).
The noise multiplier is calibrated once, for the steps the client is planned to take over the whole run
(``planned_steps``), so that its epsilon after those steps is at most ``target_epsilon``.

The accountant's history ``[(noise_multiplier, sample_rate, steps), ...]`` is the client's persistent state:
it is saved after every round and reloaded before the next (the official FedSVD code re-creates the
accountant every round and logs a per-round epsilon, which under-reports the spent budget). Before a round
the client checks the epsilon it WOULD have after that round's steps; if that exceeds the target it does not
train. The server's client sampling is not part of this accounting (no amplification by client sampling is
claimed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of every client (official FedSVD: delta 1e-5, max_grad_norm 2, RDP accountant)."""

    target_epsilon: float
    target_delta: float = 1e-5
    max_grad_norm: float = 2.0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be positive, got {self.target_epsilon}")
        if not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")


def make_accountant(mechanism: str, history: Optional[list] = None):
    """A fresh Opacus accountant of ``mechanism`` holding ``history`` (a list of ``(sigma, q, steps)``)."""
    from opacus.accountants.utils import create_accountant

    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [tuple(h) for h in (history or [])]
    return accountant


def epsilon_of(history: list, delta: float, mechanism: str = "rdp") -> float:
    """Epsilon of a schedule ``[(sigma, q, steps), ...]`` (0 for an empty one), replayed by Opacus."""
    if not history:
        return 0.0
    return float(make_accountant(mechanism, history).get_epsilon(delta=delta))


def calibrate_noise(config: DPConfig, sample_rate: float, planned_steps: int) -> float:
    """The noise multiplier that spends exactly (up to Opacus' tolerance, never more) the target epsilon
    in ``planned_steps`` steps at ``sample_rate``."""
    from opacus.accountants.utils import get_noise_multiplier

    if planned_steps <= 0:
        raise ValueError(f"planned_steps must be positive, got {planned_steps}")
    return float(
        get_noise_multiplier(
            target_epsilon=config.target_epsilon,
            target_delta=config.target_delta,
            sample_rate=sample_rate,
            steps=planned_steps,
            accountant=config.accountant,
        )
    )


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus' Poisson rate for a loader of ``ceil(n / batch)`` batches: ``q = 1 / ceil(n / batch)``."""
    return 1.0 / math.ceil(num_examples / batch_size)


@dataclass
class ClientPrivacy:
    """One client's run-long privacy state: its fixed noise multiplier, sample rate and accountant history.

    ``state_dict()`` / ``from_state()`` round-trip through plain JSON types, so the state can live in
    Flower's per-node ``Context.state`` between rounds.
    """

    config: DPConfig
    sample_rate: float
    noise_multiplier: float
    history: list = field(default_factory=list)
    rounds: list = field(default_factory=list)  # server rounds in which this client trained
    skipped: list = field(default_factory=list)  # rounds it was sampled but refused (budget)

    @classmethod
    def create(
        cls, config: DPConfig, num_examples: int, batch_size: int, planned_steps: int
    ) -> ClientPrivacy:
        """Calibrate the noise for ``planned_steps`` Poisson steps with ``q = batch_size / num_examples``."""
        if num_examples <= 0:
            raise ValueError("a client needs at least one example")
        sample_rate = poisson_sample_rate(num_examples, batch_size)
        return cls(config, sample_rate, calibrate_noise(config, sample_rate, planned_steps))

    @property
    def steps(self) -> int:
        """Optimizer steps accounted so far."""
        return int(sum(h[2] for h in self.history))

    def epsilon(self) -> float:
        """Epsilon spent so far (at ``target_delta``)."""
        return epsilon_of(self.history, self.config.target_delta, self.config.accountant)

    def epsilon_after(self, steps: int) -> float:
        """Epsilon this client would have after ``steps`` more steps."""
        extra = [(self.noise_multiplier, self.sample_rate, int(steps))] if steps > 0 else []
        return epsilon_of(self.history + extra, self.config.target_delta, self.config.accountant)

    def can_train(self, steps: int) -> bool:
        """Whether ``steps`` more steps keep this client within ``target_epsilon``."""
        return self.epsilon_after(steps) <= self.config.target_epsilon

    def report(self) -> dict[str, Any]:
        """What the run report states for this client."""
        return {
            "rounds_trained": list(self.rounds),
            "rounds_refused": list(self.skipped),
            "steps": self.steps,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.config.max_grad_norm,
            "delta": self.config.target_delta,
            "target_epsilon": self.config.target_epsilon,
            "accountant": self.config.accountant,
            "history": [list(h) for h in self.history],
            "epsilon": self.epsilon(),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state (config included)."""
        return {
            "config": {
                "target_epsilon": self.config.target_epsilon,
                "target_delta": self.config.target_delta,
                "max_grad_norm": self.config.max_grad_norm,
                "accountant": self.config.accountant,
            },
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "history": [list(h) for h in self.history],
            "rounds": list(self.rounds),
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ClientPrivacy:
        """Inverse of :meth:`state_dict`."""
        return cls(
            DPConfig(**state["config"]),
            float(state["sample_rate"]),
            float(state["noise_multiplier"]),
            [tuple(h) for h in state["history"]],
            list(state["rounds"]),
            list(state["skipped"]),
        )


def dp_train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    privacy: ClientPrivacy,
    steps: int,
    step_fn,
    noise_generator: Optional[torch.Generator] = None,
) -> list[float]:
    """Run ``steps`` DP-SGD steps with Opacus and append them to ``privacy.history``.

    ``data_loader`` is the client's ordinary loader over a dataset of tuples (its batch size sets ``q``);
    Opacus replaces it by a Poisson-sampling loader with the same expected batch size.
    ``step_fn(model, batch) -> loss`` computes the mean loss of a batch (a tuple of tensors).
    The engine's accountant starts from ``privacy.history`` (the run-long state) and
    Opacus' own step hook records every noisy step. The model's hooks are removed afterwards (the model is
    not wrapped: ``wrap_model=False``).
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=privacy.config.accountant)
    engine.accountant.history = [tuple(h) for h in privacy.history]
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.config.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator,
        wrap_model=False,
    )
    rate = 1.0 / len(dp_loader)
    if abs(rate - privacy.sample_rate) > 1e-12:
        hooks.cleanup()
        raise ValueError(f"the loader's sample rate {rate} differs from the calibrated {privacy.sample_rate}")
    losses: list[float] = []
    try:
        iterator = iter(dp_loader)
        while len(losses) < steps:
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(dp_loader)
                continue
            dp_optimizer.zero_grad(set_to_none=True)
            if len(batch[0]) == 0:  # Poisson sampling drew an empty batch: a noise-only step
                for group in dp_optimizer.param_groups:
                    for p in group["params"]:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                dp_optimizer.step()
                losses.append(float("nan"))
                continue
            loss = step_fn(model, batch)
            loss.backward()
            dp_optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        hooks.cleanup()
    history = [tuple(h) for h in engine.accountant.history]
    wrong = [h for h in history if (h[0], h[1]) != (privacy.noise_multiplier, privacy.sample_rate)]
    accounted = sum(h[2] for h in history) - privacy.steps
    if wrong or accounted != steps:
        raise RuntimeError(
            f"Opacus accounted {accounted} steps (expected {steps}); unexpected entries: {wrong}"
        )
    privacy.history = history
    return losses
