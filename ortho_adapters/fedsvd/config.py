"""Configuration of FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated
Learning with LoRA", arXiv 2505.12805)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ..core.config import OrthoAdapterConfig


@dataclass
class FedSVDConfig(OrthoAdapterConfig):
    """FedSVD client adapter: ``y = x W0^T + s (x A^T) B^T`` with frozen ``A`` and trainable ``B``.

    ``A`` (r x n) is a persistent buffer with orthonormal rows (saved with the adapter; the server
    re-factorizes it every round, see :func:`ortho_adapters.fedsvd.aggregate`). ``B`` (m x r) is the only
    trainable tensor: the weight of an ``nn.Linear(r, m, bias=False)`` leaf applied to ``u = x A^T``, so
    Opacus computes its per-sample gradients natively and exactly.

    Args:
        r: rank; ``m * r`` trainable values per adapted ``m x n`` matrix.
        alpha: scaling numerator, ``s = alpha / r`` (default ``alpha = r``, ``s = 1``).
        init_seed: seed of the random orthonormal ``A`` (combined with the layer's name, so layers differ);
            a private ``torch.Generator`` is used, the global RNG is never touched.
        init_weights: ``True`` (default): ``B = 0``, the model starts exactly at the base model.
            ``False``: a small random ``B`` (PEFT's convention for tests: a non-identity start).
    """

    PEFT_TYPE_NAME: ClassVar[str] = "FEDSVD"

    r: int = field(default=8, metadata={"help": "Rank (m*r trainable values per matrix)."})
    alpha: Optional[float] = field(default=None, metadata={"help": "Scaling alpha/r; default alpha = r."})
    init_seed: int = field(default=0, metadata={"help": "Seed of the random orthonormal A."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is None:
            self.alpha = float(self.r)
        if self.alpha <= 0:
            raise ValueError(f"FedSVDConfig.alpha must be positive, got {self.alpha}")
        if not isinstance(self.init_seed, int) or isinstance(self.init_seed, bool):
            raise ValueError(f"FedSVDConfig.init_seed must be an int, got {self.init_seed!r}")
