"""The one finite-value guard of every data-driven step (and of every init that reads a base weight).

Statistics reduced from data -- gradient sums, input covariances, activations / features, losses -- and
base weights that an SVD or LU init reads are checked with :func:`check_finite` before anything derived from
them is installed. One NaN or Inf raises :class:`NonFiniteError` (a ``ValueError``) naming the step, the
layer and the statistic; the callers compute and check everything first and install afterwards (or restore
a snapshot), so a failed call leaves the model exactly as it was.

The check is one fused reduction per tensor (``torch.aminmax``, NaN-propagating, a single device-to-host
sync; see :func:`all_finite`); the NaN / Inf counts are only computed once it has failed
(``scripts/bench_finite_checks.py`` times it against the SVDs of a SmolLM2-135M init).
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .base_weight import whole_base_weight


class NonFiniteError(ValueError):
    """A statistic gathered from data (or a base weight an init reads) holds NaN or Inf values.

    Attributes:
        step: the step that gathered or read it (e.g. ``"initialize_lora_sb"``).
        statistic: what the tensor is (e.g. ``"gradient sum G = sum dy^T x"``).
        layer: the module name (``None`` for a model-level value such as a batch's loss).
        kind: ``"NaN"``, ``"Inf"`` or ``"NaN and Inf"``.
        nan, inf, numel: the number of NaN values, of +-Inf values and of all values.
    """

    def __init__(
        self,
        step: str,
        statistic: str,
        layer: Optional[str],
        nan: int,
        inf: int,
        numel: int,
        hint: Optional[str] = None,
    ) -> None:
        self.step, self.statistic, self.layer = step, statistic, layer
        self.nan, self.inf, self.numel = nan, inf, numel
        self.kind = " and ".join(k for k, n in (("NaN", nan), ("Inf", inf)) if n) or "NaN"
        where = "" if layer is None else f" of layer '{layer}'"
        message = (
            f"{step}: {statistic}{where} has {self.kind} values ({nan} NaN, {inf} Inf among {numel} values)"
        )
        super().__init__(message + (f"; {hint}" if hint else ""))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a non-empty float tensor holds no NaN / Inf: ONE fused reduction over it, one host sync.

    ``torch.aminmax`` reads the tensor once and propagates NaN (documented), so both ends are finite exactly
    when every value is; on CPU it is ~10x faster than ``torch.isfinite(t).all()``, which first writes a
    bool tensor of the same size (``scripts/bench_finite_checks.py`` times both). Complex tensors use the
    latter.
    """
    if tensor.is_complex():
        return bool(torch.isfinite(tensor).all())
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(
    value: Union[torch.Tensor, numbers.Real],
    *,
    step: str,
    statistic: str,
    layer: Optional[str] = None,
    hint: Optional[str] = None,
) -> None:
    """Raise :class:`NonFiniteError` if ``value`` (a tensor or a number) holds a NaN or an Inf.

    One fused reduction per tensor (:func:`all_finite`); the NaN / Inf counts of the message are computed
    only on failure. Integer and bool tensors (always finite), empty and meta tensors (no values) pass.
    """
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value))
    if (
        value.device.type == "meta"
        or value.numel() == 0
        or not (value.is_floating_point() or value.is_complex())
    ):
        return
    if all_finite(value):
        return
    nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
    raise NonFiniteError(step, statistic, layer, nan, inf, value.numel(), hint)


def check_base_weight(module: nn.Module, *, step: str, layer: str, hint: Optional[str] = None) -> None:
    """:func:`check_finite` on the base weight of ``module`` (a tuner layer, or the plain / quantized base).

    Quantized weights are dequantized for the check (a CPU-packed 4-bit weight is restored first) and a
    ZeRO-3 partitioned weight is gathered, as :func:`~ortho_adapters.core.base_weight.read_weight` does.
    """
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        return
    with whole_base_weight(base) as values:
        check_finite(
            values.detach(),
            step=step,
            statistic="base weight",
            layer=layer,
            hint=hint or "the base model itself holds non-finite weights; the model was left unchanged",
        )
