"""Configuration of HUT (Zhang, Zhou & Chen, arXiv 2409.13501)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from ..core.config import OrthoAdapterConfig

HUTExecution = Literal["auto", "materialize", "factored"]
EXECUTIONS: tuple[str, ...] = ("auto", "materialize", "factored")


@dataclass
class HUTConfig(OrthoAdapterConfig):
    """HUT ("Hadamard Updated Transformation"): ``W' = W0 ⊙ M`` with ``M = 1 + s B A``, ``s = alpha / r``.

    The new weight is a function of the old one (the paper's "updated transformation" paradigm): the
    Hadamard product of ``W0`` (m x n) with a matrix built from two trainable low-rank factors ``B``
    (m x r, zero at init) and ``A`` (r x n, LoRA's Kaiming-uniform init), so training starts exactly at the
    base model. The paper's method section could not be read from a primary source here: this exact
    ``M``, its init and scaling are this package's reading (see the README), not a quotation.

    Args:
        r: rank of ``B A``; ``r * (m + n)`` trainable values per adapted matrix.
        alpha: ``s = alpha / r`` (default ``alpha = r``, so ``s = 1``).
        dropout: dropout on the input of the adapter's part ``x (W0 ⊙ s B A)^T`` only (as LoRA's dropout).
            While it is active (training, ``dropout > 0``) the materialized path cannot fold the base and
            the update into one GEMM and runs two (base + materialized update on the dropped input).
        execution: how forward/backward is computed, with identical results:

            * ``"materialize"``: form ``W'`` once per call (``m n r`` work, independent of the number of
              tokens ``T``) and run ONE GEMM ``x W'^T + bias`` instead of the base layer's own.
            * ``"factored"``: ``base(x) + s sum_i B[:, i] ⊙ (W0 (A[i] ⊙ x))`` (``r`` GEMMs with ``W0``).
            * ``"auto"`` (default): per call, the path with fewer estimated multiply-adds
              (:func:`ortho_adapters.hut.execution.path_costs`); in practice ``"factored"`` only for a
              handful of tokens (``T = 1`` in inference, ``T <= 2`` in training at ``r = 8``).
    """

    PEFT_TYPE_NAME: ClassVar[str] = "HUT"

    r: int = field(default=8, metadata={"help": "Rank of B A; r * (out + in) trainable values per matrix."})
    alpha: Optional[float] = field(
        default=None, metadata={"help": "Scaling s = alpha / r; default alpha = r."}
    )
    execution: HUTExecution = field(
        default="auto", metadata={"help": "'auto', 'materialize' (one GEMM with W') or 'factored' (r GEMMs)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.execution not in EXECUTIONS:
            raise ValueError(f"HUTConfig.execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.alpha is None:
            self.alpha = float(self.r)
        if not self.alpha > 0:
            raise ValueError(f"HUTConfig.alpha must be positive, got {self.alpha}")
