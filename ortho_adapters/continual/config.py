"""Configuration of orthogonal continual LoRA: O-LoRA (Wang et al., 2023, arXiv 2310.14152) and an
SVD-subspace variant in the style of GPM (Saha et al., 2021) / InfLoRA (Liang & Li, CVPR 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Union

from ..core.config import OrthoAdapterConfig

MODES = ("subspace", "olora")


@dataclass
class OrthoLoraConfig(OrthoAdapterConfig):
    """One PEFT adapter holding every task of a sequence: ``W' = W + s * sum_t B_t A_t``, ``s = alpha / r``.

    ``mode="subspace"`` (default): task ``t``'s ``A_t`` (r x n, orthonormal rows) is frozen and lies in the
    orthogonal complement of ``M``, the union of earlier tasks' input bases (each keeps ``energy`` of its
    task's input spectrum); only ``B_t`` (zero init) trains, so ``dW_t M = 0`` holds under any optimizer.
    ``mode="olora"``: ``A_t`` (kaiming) and ``B_t`` (zero) train; the loss gets
    ``l1 * sum |A_old A_t^T| + l2 * (||A_t||_F + ||B_t||_F)`` (see :mod:`ortho_adapters.continual.penalty`).

    The task list is kept here and updated by :func:`ortho_adapters.continual.start_task` /
    :func:`~ortho_adapters.continual.end_task`, so ``adapter_config.json`` tells a fresh process how many
    task factors to create before PEFT loads the saved tensors.

    Args:
        mode: ``"subspace"`` or ``"olora"``.
        r: rank per task.
        alpha: scaling numerator, ``s = alpha / r``.
        energy: share of each task's input-covariance spectrum its basis keeps (subspace mode). A float is
            used for every task; a list gives task ``t`` the value ``energy[min(t, len - 1)]`` (rising per
            task, GPM / InfLoRA style). Default 0.99: the uncentred input covariance of transformer hidden
            states is dominated by one common direction, so 0.95 can keep a 1-dimensional basis (measured on
            MiniLM) and leave a task's discriminative directions unprotected.
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
    energy: Union[float, list[float]] = field(
        default_factory=lambda: [0.99],
        metadata={"help": "Spectrum share each task's input basis keeps; a list rises per task."},
    )
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

    @property
    def num_old_tasks(self) -> int:
        """Tasks whose factors are frozen in the old stacks: every started task but the current slot."""
        return max(len(self.task_names) - 1, 0)
