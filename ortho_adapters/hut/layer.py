"""HUT tuner layer: ``y = x (W0 ⊙ (1 + s B A))^T + bias`` (arXiv 2409.13501)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base_weight import base_weight_of, read_weight
from ..core.layer import COMMON_NAMES, OrthoLayer
from ..core.precision import compute_dtype
from ..core.zero3 import gathered
from .config import HUTConfig
from .execution import choose_path, factored_update, hadamard_linear, hadamard_multiplier, path_costs

# Entries of M with |M| below this are not divided out on unmerge: their pre-merge values are kept instead.
UNMERGE_GUARD = 1e-3


class HadamardFactors(nn.Module):
    """One HUT adapter's trainable ``B`` (m x r, zeros) and ``A`` (r x n, LoRA's Kaiming-uniform init).

    Called in forward with a ``path``: ``"fused"`` (``x (W0 ⊙ M)^T + bias``, one GEMM), ``"update"``
    (``x (W0 ⊙ s B A)^T``, materialized), ``"factored"`` (the same update, ``r`` GEMMs) or ``"multiplier"``
    (``M = 1 + s B A`` itself, for several active adapters).
    """

    def __init__(self, out_features: int, in_features: int, r: int, init_weights: bool = True):
        super().__init__()
        self.B = nn.Parameter(torch.zeros(out_features, r))
        self.A = nn.Parameter(torch.empty(r, in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if not init_weights:  # PEFT's convention: a random, non-identity start
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))

    def forward(
        self,
        x: Optional[torch.Tensor],
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        scaling: float,
        path: str,
        dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        if path == "multiplier":
            return hadamard_multiplier(self.B, self.A, scaling)
        if path == "factored":
            return factored_update(x, weight, self.B, self.A, scaling)
        if path in ("fused", "update"):
            return hadamard_linear(x, weight, bias, self.B, self.A, scaling, path == "fused", dtype)
        raise ValueError(f"unknown HUT path {path!r}")


def _dropout_active(module: nn.Module) -> bool:
    return isinstance(module, nn.Dropout) and module.training and module.p > 0


class HUTLayer(OrthoLayer):
    """Trainable ``B``, ``A`` in one :class:`HadamardFactors` leaf per adapter; ``W0`` is never modified.

    Forward replaces the base layer's GEMM: ``"materialize"`` runs one GEMM with ``W' = W0 ⊙ (1 + s B A)``
    (fp32 ``W'``, GEMM in the base weight's dtype; fp32 for quantized bases, output cast to the input dtype),
    ``"factored"`` adds ``s sum_i B[:, i] ⊙ (W0 (A[i] ⊙ x))`` (fp32) to the base layer's output, ``"auto"``
    picks per call (:func:`ortho_adapters.hut.execution.choose_path`). Several active adapters multiply:
    ``W' = W0 ⊙ M_1 ⊙ M_2 ...`` (materialized), matching sequential merges.
    """

    adapter_layer_names = ("hut_factors",)
    other_param_names = COMMON_NAMES + ("hut_execution",)

    def _create_containers(self) -> None:
        self.hut_factors = nn.ModuleDict()
        self.hut_execution: dict[str, str] = {}
        self._unmerge_stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def create_adapter(self, adapter_name: str, config: HUTConfig) -> None:
        self.scaling[adapter_name] = config.alpha / config.r
        self.hut_execution[adapter_name] = config.execution
        self.hut_factors[adapter_name] = HadamardFactors(
            self.out_features, self.in_features, self.r[adapter_name], config.init_weights
        )

    # ----- execution ---------------------------------------------------------------------------------
    def _compute_weight(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.dtype]:
        """The (out, in) base weight (a view, or dequantized), the base bias and the GEMM dtype.

        The GEMM dtype: the autocast dtype under autocast, else the base weight's (fp32 for quantized bases).
        """
        base = self.get_base_layer()
        bias = getattr(base, "bias", None)
        if self.quantization_backend is not None:
            weight = base_weight_of(base)  # restores a CPU-packed 4-bit layout first
            return weight, bias, compute_dtype(x, torch.float32)
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        return weight, bias, compute_dtype(x, weight.dtype)

    @contextmanager
    def _base_weight_read(self, x: torch.Tensor, weight: torch.Tensor) -> Iterator[torch.Tensor]:
        """``weight`` (from :meth:`_compute_weight`), or, when the base weight is a DeepSpeed ZeRO-3 partition
        here, the gathered weight for the duration of the block: DeepSpeed gathers it for the base layer's own
        forward and, in a forward through its engine, for any module that reads it, but a forward outside the
        engine (``generate()``, a plain ``model(...)``) or after the base layer's forward finds a partition.
        The gathered weight is passed on as a view, so what autograd saves outlives the partitioning.
        """
        base = self.get_base_layer()
        params = [p for p in (base.weight, getattr(base, "bias", None)) if isinstance(p, torch.Tensor)]
        with gathered(params) as regathered:
            if regathered:
                weight = self._compute_weight(x)[0]
                weight = weight.view(weight.shape)
            yield weight

    def execution_path(self, adapter_name: str, x: torch.Tensor, dropout: bool = False) -> str:
        """``"materialize"`` or ``"factored"`` for this call (``execution="auto"``: fewer multiply-adds)."""
        mode = self.hut_execution[adapter_name]
        if mode != "auto":
            return mode
        grad = torch.is_grad_enabled()
        grad_factors = grad and any(p.requires_grad for p in self.hut_factors[adapter_name].parameters())
        tokens = x.numel() // max(x.shape[-1], 1)
        r = self.r[adapter_name]
        costs = path_costs(
            tokens, self.out_features, self.in_features, r, grad and x.requires_grad, grad_factors, dropout
        )
        return choose_path(costs)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.active_adapter_names()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if len(names) > 1:
            return self._stacked_forward(names, x)
        name = names[0]
        leaf, dropout, scaling = self.hut_factors[name], self.adapter_dropout[name], self.scaling[name]
        dropping = _dropout_active(dropout)
        weight, bias, dtype = self._compute_weight(x)
        path = self.execution_path(name, x, dropping)
        if path == "materialize" and not dropping:
            with self._base_weight_read(x, weight) as weight:
                out = leaf(x, weight, bias, scaling, "fused", dtype)
            return out if self.quantization_backend is None else out.to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        with self._base_weight_read(x, weight) as weight:  # the base layer's forward released a ZeRO-3 weight
            if path == "materialize":
                update = leaf(dropout(x), weight, None, scaling, "update", dtype)
            else:
                update = leaf(dropout(self.adapter_input(name, x)), weight, None, scaling, "factored")
        return result + update.to(result.dtype)

    def _stacked_forward(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        """``x (W0 ⊙ M_1 ⊙ ... ⊙ M_k)^T + bias`` for several active adapters (plain autograd)."""
        if any(_dropout_active(self.adapter_dropout[name]) for name in names):
            raise ValueError(
                f"HUT layer '{self.module_name}': several active adapters {names} with dropout > 0 in "
                "training mode are not supported; activate one adapter at a time or set dropout=0"
            )
        weight, bias, dtype = self._compute_weight(x)
        multiplier = None
        for name in names:
            m = self.hut_factors[name](None, None, None, self.scaling[name], "multiplier")
            multiplier = m if multiplier is None else multiplier * m
        with self._base_weight_read(x, weight) as weight, torch.autocast(x.device.type, enabled=False):
            bias = None if bias is None else bias.to(dtype)
            out = F.linear(x.to(dtype), (weight.float() * multiplier).to(dtype), bias)
        return out if self.quantization_backend is None else out.to(x.dtype)

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The additive update ``x (W0 ⊙ s B A)^T`` in ``x``'s dtype (factored form)."""
        leaf = self.hut_factors[adapter_name]
        with self._base_weight_read(x, self._compute_weight(x)[0]) as weight:
            return factored_update(x, weight, leaf.B, leaf.A, self.scaling[adapter_name])

    # ----- merging -----------------------------------------------------------------------------------
    def _multiplier(self, adapter_name: str) -> torch.Tensor:
        leaf = self.hut_factors[adapter_name]
        return hadamard_multiplier(leaf.B.detach(), leaf.A.detach(), self.scaling[adapter_name])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W0 ⊙ s B A`` (fp32) for the current base weight ``W0``."""
        return read_weight(self) * (self._multiplier(adapter_name) - 1.0)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W ⊙ (1 + s B A)``; entries where ``|M| < UNMERGE_GUARD`` are remembered for an exact unmerge."""
        multiplier = self._multiplier(adapter_name)
        small = (multiplier.abs() < UNMERGE_GUARD).flatten().nonzero().squeeze(1)
        if small.numel():
            self._unmerge_stash[adapter_name] = (small, weight.flatten()[small].clone())
        else:
            self._unmerge_stash.pop(adapter_name, None)
        return weight * multiplier

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W / (1 + s B A)``; entries with ``|M| < UNMERGE_GUARD`` get their values from before the merge.

        Elementwise division recovers each entry to a few ulp of the stored dtype whatever the size of ``M``
        (for float bases); only entries of ``M`` near zero, whose product lost ``W``, need the stored values.
        """
        multiplier = self._multiplier(adapter_name)
        small = multiplier.abs() < UNMERGE_GUARD
        stash = self._unmerge_stash.pop(adapter_name, None)
        if stash is None and small.any():
            raise ValueError(
                f"Cannot unmerge HUT adapter '{adapter_name}' from '{self.module_name}': {int(small.sum())} "
                f"entries of M = 1 + sBA are below {UNMERGE_GUARD} and their pre-merge weights were not "
                "recorded (was the adapter merged by this layer?)"
            )
        out = weight / torch.where(small, torch.ones_like(multiplier), multiplier)
        if stash is not None:
            index, values = stash
            out.view(-1)[index] = values.to(out.device)
        return out
