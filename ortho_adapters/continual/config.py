"""Configuration of orthogonal continual LoRA: O-LoRA (Wang et al., 2023, arXiv 2310.14152), an
SVD-subspace variant in the style of GPM (Saha et al., 2021) / InfLoRA (Liang & Li, CVPR 2024), its variant
with ``A`` chosen from the new task's gradient, and a scaled projection after SGP (Saha & Roy, AAAI 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from ..core.config import OrthoAdapterConfig

MODES = ("subspace", "olora", "gradient", "scaled")
# modes whose current A is a frozen buffer chosen by the lifecycle (only B trains) and which keep a basis M
STRUCTURAL_MODES = ("subspace", "gradient", "scaled")


@dataclass
class OrthoLoraConfig(OrthoAdapterConfig):
    """One PEFT adapter holding every task of a sequence: ``W' = W + s * sum_t B_t A_t``, ``s = alpha / r``.

    ``mode="subspace"`` (default): task ``t``'s ``A_t`` (r x n, orthonormal rows) is frozen and lies in the
    orthogonal complement of ``M``, the union of earlier tasks' input bases (each keeps ``energy`` of its
    task's input spectrum); only ``B_t`` (zero init) trains, so ``dW_t M = 0`` holds under any optimizer.
    ``mode="gradient"``: as ``subspace`` (same basis, same exact guarantee ``dW_t M = 0``), but ``A_t`` is the
    top-r right singular vectors of ``G Q``, with ``G = dL/dW`` the new task's loss gradient at the task's
    start and ``Q`` an orthonormal basis of the complement of ``M``: the frozen ``A`` along which ``B``'s
    first steps reduce the loss fastest (InfLoRA's "A from the gradient" idea).
    ``mode="scaled"``: SGP-style soft protection. Each basis direction ``u_i`` carries an importance
    ``lambda_i`` in [0, 1] (``sgp_scale`` below); ``A_t = V^T P`` with ``P = I - M diag(lambda) M^T`` and
    ``V^T`` (frozen, orthonormal) the top-r right singular vectors of ``G P``, so ``dW_t u_i = (1 - lambda_i)
    s B_t V^T u_i`` under any optimizer: a change along ``u_i`` is damped by exactly ``1 - lambda_i``
    (``lambda_i = 1``: blocked, as in ``subspace``).
    ``mode="olora"``: ``A_t`` (kaiming) and ``B_t`` (zero) train; the loss gets
    ``l1 * sum |A_old A_t^T| + l2 * (||A_t||_F + ||B_t||_F)`` (see :mod:`ortho_adapters.continual.penalty`).

    The task list is kept here and updated by :func:`ortho_adapters.continual.start_task` /
    :func:`~ortho_adapters.continual.end_task`, so ``adapter_config.json`` tells a fresh process how many
    task factors to create before PEFT loads the saved tensors.

    Args:
        mode: ``"subspace"``, ``"gradient"``, ``"scaled"`` or ``"olora"``.
        r: rank per task, and the reference rank of the scaling ``s = alpha / r`` shared by every task.
        alpha: scaling numerator, ``s = alpha / r``.
        task_ranks: optional rank schedule: task ``t`` gets rank ``task_ranks[min(t, len - 1)]`` instead of
            ``r`` (e.g. ``[4, 6, 8, 8, 10, 12]``: more rank for later tasks at the total of six tasks at
            ``r = 8``). Every task keeps the scaling ``alpha / r``, so a rank-``r_t`` task moves the output as
            fast per step as a rank-``r`` one. ``None`` (default): every task has rank ``r``.
        energy: share of each task's input-covariance spectrum its basis keeps (subspace mode). A float is
            used for every task; a list gives task ``t`` the value ``energy[min(t, len - 1)]`` (rising per
            task, GPM / InfLoRA style). Default 0.99: the uncentred input covariance of transformer hidden
            states is dominated by one common direction, so 0.95 can keep a 1-dimensional basis (measured on
            MiniLM) and leave a task's discriminative directions unprotected.
        room_share: per-layer room rule of the structural modes, in (0, 1]: one task's ``end_task`` adds at
            most ``floor(room_share * (n - k))`` directions to a layer's basis (``n - k``: the dimensions
            still free there), whatever ``energy`` asks for. 1.0 (default): no cap (GPM). Below 1 every layer
            keeps room for later tasks, and a layer with little room left protects less of each new task.
        sgp_scale: SGP's scale ``a > 0`` (scaled mode). A task whose input covariance has eigenvalue
            ``e_max = s_max^2`` gives basis direction ``u_i`` (task energy ``e_i = u_i^T C u_i = s_i^2``) the
            importance ``a e_i / ((a - 1) e_i + e_max)``; ``lambda_i`` is the largest importance any finished
            task gave it. ``a -> inf`` approaches ``subspace`` (every basis direction blocked); ``a = 1``
            gives ``e_i / e_max``.
        l1: weight of O-LoRA's orthogonality penalty ``sum |A_old A_t^T|`` (olora mode).
        l2: weight of the norm penalty on the current task's factors (olora mode).
        init_seed: seed of the random parts (subspace ``A`` without data, olora kaiming ``A``), mixed with the
            layer name and task index; a private generator is used.
        task_names: names of the started tasks (maintained by the lifecycle; do not edit).
        tasks_ended: how many of them ``end_task`` has closed (maintained by the lifecycle).
    """

    PEFT_TYPE_NAME: ClassVar[str] = "ORTHO_LORA"

    mode: str = field(default="subspace", metadata={"help": "'subspace' (default) or 'olora'."})
    r: int = field(default=8, metadata={"help": "Rank per task."})
    alpha: float = field(default=32.0, metadata={"help": "Scaling alpha/r."})
    task_ranks: Optional[list[int]] = field(
        default=None, metadata={"help": "Rank of task t: task_ranks[min(t, len - 1)] (default: r)."}
    )
    energy: Union[float, list[float]] = field(
        default_factory=lambda: [0.99],
        metadata={"help": "Spectrum share each task's input basis keeps; a list rises per task."},
    )
    room_share: float = field(
        default=1.0, metadata={"help": "Most of a layer's free input dimensions one task's basis takes."}
    )
    sgp_scale: float = field(default=10.0, metadata={"help": "SGP's importance scale a > 0 (scaled mode)."})
    l1: float = field(default=0.5, metadata={"help": "O-LoRA orthogonality penalty weight."})
    l2: float = field(default=0.0, metadata={"help": "O-LoRA norm penalty weight."})
    init_seed: int = field(default=0, metadata={"help": "Seed of the random initializations."})
    task_names: list[str] = field(default_factory=list, metadata={"help": "Started tasks (lifecycle)."})
    tasks_ended: int = field(default=0, metadata={"help": "Tasks closed by end_task (lifecycle)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"OrthoLoraConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.alpha is None or self.alpha <= 0:
            raise ValueError(f"OrthoLoraConfig.alpha must be positive, got {self.alpha}")
        energies = self.energy if isinstance(self.energy, (list, tuple)) else [self.energy]
        if not energies or not all(isinstance(e, (int, float)) and 0.0 < e <= 1.0 for e in energies):
            raise ValueError(
                f"OrthoLoraConfig.energy must be a value or list of values in (0, 1], got {self.energy}"
            )
        if isinstance(self.energy, tuple):
            self.energy = list(self.energy)
        if self.task_ranks is not None:
            ranks = list(self.task_ranks) if isinstance(self.task_ranks, (list, tuple)) else None
            if not ranks or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ranks):
                raise ValueError(
                    f"OrthoLoraConfig.task_ranks must be None or a non-empty list of positive ints, "
                    f"got {self.task_ranks!r}"
                )
            if self.r is None:
                raise ValueError("OrthoLoraConfig.task_ranks needs an int r (the scaling's reference rank)")
            self.task_ranks = ranks
        if (
            isinstance(self.room_share, bool)
            or not isinstance(self.room_share, (int, float))
            or not 0.0 < self.room_share <= 1.0
        ):
            raise ValueError(f"OrthoLoraConfig.room_share must be in (0, 1], got {self.room_share!r}")
        if (
            isinstance(self.sgp_scale, bool)
            or not isinstance(self.sgp_scale, (int, float))
            or not math.isfinite(self.sgp_scale)
            or self.sgp_scale <= 0
        ):
            raise ValueError(f"OrthoLoraConfig.sgp_scale must be a finite number > 0, got {self.sgp_scale!r}")
        if self.l1 < 0 or self.l2 < 0:
            raise ValueError(f"OrthoLoraConfig.l1 and l2 must be >= 0, got {self.l1}, {self.l2}")
        if not isinstance(self.init_seed, int) or isinstance(self.init_seed, bool):
            raise ValueError(f"OrthoLoraConfig.init_seed must be an int, got {self.init_seed!r}")
        self.task_names = list(self.task_names or [])
        if not 0 <= self.tasks_ended <= len(self.task_names):
            raise ValueError(
                f"OrthoLoraConfig.tasks_ended={self.tasks_ended} must be between 0 and the number of tasks "
                f"({len(self.task_names)})"
            )

    def energy_for_task(self, index: int) -> float:
        """The energy threshold of task ``index`` (0-based)."""
        if isinstance(self.energy, (list, tuple)):
            return float(self.energy[min(index, len(self.energy) - 1)])
        return float(self.energy)

    def rank_for_task(self, index: int) -> int:
        """The rank of task ``index`` (0-based): ``task_ranks[min(index, len - 1)]``, or ``r``."""
        if self.task_ranks:
            return int(self.task_ranks[min(index, len(self.task_ranks) - 1)])
        return int(self.r)

    def old_rows(self, count: int) -> int:
        """Rows of the old stacks ``A_old`` once ``count`` tasks are frozen: the sum of their ranks."""
        return sum(self.rank_for_task(t) for t in range(count))

    @property
    def structural(self) -> bool:
        """Whether the current ``A`` is a frozen buffer chosen by the lifecycle and a basis ``M`` is kept."""
        return self.mode in STRUCTURAL_MODES

    @property
    def num_old_tasks(self) -> int:
        """Tasks whose factors are frozen in the old stacks: every started task but the current slot."""
        return max(len(self.task_names) - 1, 0)
