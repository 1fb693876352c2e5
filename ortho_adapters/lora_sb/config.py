"""Configuration of LoRA-SB (Ponkshe et al., arXiv 2411.19557)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from ..core.config import OrthoAdapterConfig


@dataclass
class LoraSBConfig(OrthoAdapterConfig):
    """LoRA-SB: ``y = x W0^T + s ((x A^T) R^T) B^T`` with frozen ``B``, ``A`` and trainable ``R`` (r x r).

    Args:
        r: rank; ``r * r`` trainable values per adapted matrix.
        alpha: scaling numerator, ``s = alpha / r`` (default ``alpha = r``, so ``s = 1`` as in the paper).
        init: ``"svd"`` (default, LoRA-XS): ``B = U_r S_r``, ``A = V_r^T`` from the SVD of ``W0`` and
            ``R = 0``, so the model starts exactly at the base model. ``"gradient"`` (LoRA-SB): ``B, R, A``
            from the truncated SVD of the estimated first full fine-tuning update, computed by
            :func:`ortho_adapters.initialize_lora_sb` (before or after ``get_peft_model``).
        subtract_init: only for ``init="gradient"``. ``False`` (the official code's behaviour): the model
            starts at ``W0 + B R0 A``, one estimated optimizer step away from the base. ``True``: a frozen
            copy ``R0`` of the initial ``R`` is subtracted (``R - R0`` is used), so training starts exactly
            at the base model.
    """

    PEFT_TYPE_NAME: ClassVar[str] = "LORA_SB"

    r: int = field(default=16, metadata={"help": "Rank (r*r trainable values per matrix)."})
    alpha: Optional[float] = field(default=None, metadata={"help": "Scaling alpha/r; default alpha = r."})
    init: Literal["svd", "gradient"] = field(
        default="svd", metadata={"help": "'svd' (exact base) or 'gradient'."}
    )
    subtract_init: bool = field(
        default=False, metadata={"help": "Start exactly at the base with init='gradient'."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("svd", "gradient"):
            raise ValueError(f"LoraSBConfig.init must be 'svd' or 'gradient', got {self.init!r}")
        if self.alpha is None:
            self.alpha = float(self.r)
        if self.alpha <= 0:
            raise ValueError(f"LoraSBConfig.alpha must be positive, got {self.alpha}")
