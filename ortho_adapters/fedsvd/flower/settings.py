"""Settings of one federated run, shared by the ServerApp and (through the train message) the ClientApps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ..privacy import DPConfig
from ..task import ARMS, AdapterSpec

SECAGG_CLIPPING_RANGE = 8.0  # SecAgg+ clips each scaled update value to +-this (Flower's default)
SECAGG_MIN_CLIENTS = 3  # with 2 clients in a round, each could subtract its own update from the sum


@dataclass
class FedSettings:
    """Everything a run needs; flat scalars only, so it travels in a Flower ``ConfigRecord``.

    ``epsilon = 0`` means no differential privacy. ``planned_rounds = 0`` means the expected number of rounds
    a client is sampled in, ``ceil(rounds * clients_per_round / num_clients)``: each client's noise is
    calibrated so that this many rounds of ``local_steps`` steps spend exactly ``epsilon``; a client sampled
    more often refuses to train once its next round would exceed ``epsilon``. ``experiment_id`` keys each
    client's node-local privacy ledger (SuperNodes started with ``--node-config "state-dir=<dir>"``): runs
    of one experiment share one budget, across restarts too. ``checkpoint_dir``: the server writes the
    global state after every round there and a new run with the same settings resumes after the last
    finished round (:mod:`.checkpoint`). ``secure_aggregation``: SecAgg+ (:mod:`.secagg_server`); the server
    learns only the weighted average of each round's updates; needs ``clients_per_round >= 3``.
    """

    arm: str = "fedsvd"
    rounds: int = 10
    num_clients: int = 6
    clients_per_round: int = 3
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 0.5
    momentum: float = 0.0
    r: int = 8
    alpha: float = 16.0
    targets: str = "query,value"
    train_head: bool = True
    max_length: int = 48
    n_train: int = 2000
    n_eval: int = 500
    dirichlet_alpha: float = 0.5
    epsilon: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 2.0
    accountant: str = "rdp"
    planned_rounds: int = 0
    seed: int = 0
    experiment_id: str = "fedsvd"
    checkpoint_dir: str = ""
    secure_aggregation: bool = False
    report: str = ""
    node_wait_s: float = 120.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError("clients_per_round must be between 1 and num_clients")
        for name in ("rounds", "local_steps", "batch_size", "r", "n_train", "n_eval", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.secure_aggregation and self.clients_per_round < SECAGG_MIN_CLIENTS:
            raise ValueError(
                f"secure_aggregation needs clients_per_round >= {SECAGG_MIN_CLIENTS} (with 2, each client "
                f"could read the other's update from the sum), got {self.clients_per_round}"
            )
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0 (0 = no DP), got {self.epsilon}")

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.arm, self.r, self.alpha, self.target_list, self.train_head, self.seed)

    @property
    def secagg_max_weight(self) -> float:
        """SecAgg+ ``max_weight``; no client has more than ``n_train`` examples: ``n_i / max_weight <= 1``."""
        return float(self.n_train)

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets.split(",") if t)

    @property
    def dp(self) -> Optional[DPConfig]:
        if self.epsilon == 0:
            return None
        return DPConfig(self.epsilon, self.delta, self.max_grad_norm, self.accountant)

    @property
    def planned_steps(self) -> int:
        rounds = self.planned_rounds or math.ceil(self.rounds * self.clients_per_round / self.num_clients)
        return rounds * self.local_steps

    def to_record(self) -> dict[str, Any]:
        """Flat dict for a ``ConfigRecord``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FedSettings:
        """From a run config / ConfigRecord (unknown keys ignored, values coerced to the field types)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                default = f.default
                value = values[f.name]
                if isinstance(default, bool):
                    value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
                elif isinstance(default, (int, float, str)):
                    value = type(default)(value)
                kwargs[f.name] = value
        return cls(**kwargs)
