"""Configuration of LoLDU (Shi et al., arXiv 2410.13618)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from ..core.config import OrthoAdapterConfig

LoLDUInit = Literal["lu", "constant", "uniform", "normal", "s_uniform", "s_normal", "ones", "zeros"]

# Inits after which the official code subtracts the *initial* z from W0 (exact base start), and the rest,
# after which it subtracts the LU pivots d_r (not a base start).
BASE_START_INITS: tuple[str, ...] = ("lu", "constant", "uniform", "normal")
OFFSET_START_INITS: tuple[str, ...] = ("s_uniform", "s_normal", "ones", "zeros")


@dataclass
class LoLDUConfig(OrthoAdapterConfig):
    """LoLDU: ``W = W0 + PL_r diag(sigma z - sigma0 z0) U_r`` with trainable diagonal ``z`` (r values).

    ``W0 = P L D U`` is the LU factorization with partial pivoting of the base weight (fp32) with unit
    triangular ``L``, ``U``; ``PL_r = P L[:, :r]`` and ``U_r = U[:r]`` are frozen buffers, ``d_r = D[:r]``
    are the first ``r`` pivots. This is the official ``W_res + sigma PL_r diag(z) U_r`` with
    ``W_res = W0 - sigma0 PL_r diag(z0) U_r``, rewritten so that ``W0`` is never modified.

    Args:
        r: rank, ``r <= min(out, in)``; ``r`` trainable values per adapted matrix. The default ``None`` is
            full rank per layer (``min(out, in)``), which is what the official ``default_loldu_config``'s
            ``r=768`` means for the 768-wide ViT-base / RoBERTa-base projections of the paper's experiments.
        alpha: ``sigma0 = alpha / r``; the official ``from_linear`` uses ``alpha = 1``.
        init: initial ``z``, following the official ``init_method`` (``minloldu/loldu.py``):

            * ``"lu"`` (default): ``z = d_r``.
            * ``"constant"``: ``z = mean(d_r)`` for every entry.
            * ``"uniform"``: ``z ~ U(-|mean(d_r)|/2, |mean(d_r)|/2)``.
            * ``"normal"``: ``z ~ N(mean(d_r), std(d_r))``.
            * ``"s_uniform"``: ``z ~ U(-1, 1)``; ``"s_normal"``: ``z ~ N(0, 1)``; ``"ones"``; ``"zeros"``.

            The first four start exactly at the base model: the official code builds ``W_res`` from the
            initial ``z`` (for ``constant``/``uniform``/``normal`` because the in-place init writes into
            the storage of ``d_r``), so ``z0`` = initial ``z``. The last four do not: ``W_res`` uses
            ``z0 = d_r``, so training starts at ``W0 + sigma0 PL_r diag(z - d_r) U_r`` (``zeros`` removes
            the rank-r LDU part of ``W0``).
        train_sigma: also train the scalar ``sigma`` (initialized at ``sigma0``; one more value per matrix).
            The official workflow trains only ``z``.
        store_factors: save ``PL_r`` and ``U_r`` with the adapter (twice the size of the adapted weights at
            full rank). Default ``False``: the file holds ``z``, ``z0`` and a fingerprint of the base weight
            and of the LU pivoting; the factors are rebuilt at load and a base that does not match is refused.
        init_weights: ``False`` adds noise of the pivots' size to ``z`` (a random, non-identity start).
    """

    PEFT_TYPE_NAME: ClassVar[str] = "LOLDU"
    FULL_RANK_WHEN_NONE: ClassVar[bool] = True

    r: Optional[int] = field(
        default=None, metadata={"help": "Rank (r trainable values per matrix); None = full rank per layer."}
    )
    alpha: float = field(default=1.0, metadata={"help": "sigma0 = alpha / r (official: alpha = 1)."})
    init: LoLDUInit = field(default="lu", metadata={"help": "Initial z; see the class docstring."})
    train_sigma: bool = field(default=False, metadata={"help": "Also train the scalar sigma."})
    store_factors: bool = field(
        default=False, metadata={"help": "Save PL_r and U_r (else rebuilt from the base weight at load)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in BASE_START_INITS + OFFSET_START_INITS:
            raise ValueError(
                f"LoLDUConfig.init must be one of {BASE_START_INITS + OFFSET_START_INITS}, got {self.init!r}"
            )
        if not self.alpha > 0:
            raise ValueError(f"LoLDUConfig.alpha must be positive, got {self.alpha}")
