"""LoLDU tuner layer: ``y = x W0^T + sigma0 ((x U_r^T) * (z - z0)) PL_r^T`` (arXiv 2410.13618)."""

from __future__ import annotations

import warnings

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..core.base_weight import read_weight
from ..core.buffers import FactorDict
from ..core.finite import check_finite
from ..core.layer import COMMON_NAMES, OrthoLayer
from ..core.leaf import DiagonalScale
from .config import BASE_START_INITS, LoLDUConfig
from .decomposition import fingerprint, ldu_factors


def initial_z(d_r: torch.Tensor, init: str) -> torch.Tensor:
    """Initial diagonal ``z`` for ``init`` from the pivots ``d_r`` (the official ``init_method``s)."""
    if init == "lu":
        return d_r.clone()
    if init in ("ones", "zeros"):
        return torch.ones_like(d_r) if init == "ones" else torch.zeros_like(d_r)
    if init == "s_uniform":
        return torch.empty_like(d_r).uniform_(-1.0, 1.0)
    if init == "s_normal":
        return torch.randn_like(d_r)
    mean = d_r.mean().item()
    if init == "constant":
        return torch.full_like(d_r, mean)
    if init == "uniform":
        return torch.empty_like(d_r).uniform_(-abs(mean) / 2, abs(mean) / 2)
    if init == "normal":
        std = d_r.std().item() if d_r.numel() > 1 else 0.0
        return torch.empty_like(d_r).normal_(mean, std)
    raise ValueError(f"unknown LoLDU init {init!r}")


class LoLDULayer(OrthoLayer):
    """Frozen ``PL_r`` (m x r), ``U_r`` (r x n), ``z0`` (r) buffers; trainable ``z`` in a leaf module.

    The update is ``delta = PL_r diag(sigma z - sigma0 z0) U_r`` (``sigma = sigma0`` unless ``train_sigma``),
    computed as ``((x U_r^T) * diag) PL_r^T``: ``r (m + n)`` multiply-adds per token, ``u = x U_r^T`` (T x r)
    saved for backward. ``z0`` is the initial ``z`` for the base-start inits and ``d_r`` for the others.

    ``PL_r`` and ``U_r`` are a deterministic function of ``W0``: unless ``store_factors`` they are left out
    of the saved adapter and rebuilt at load, where the saved :func:`fingerprint` (hashes of ``W0`` and
    of the LU row swaps) must match the rebuilt one, or loading fails naming the layer.
    """

    adapter_layer_names = ("loldu_z",)
    other_param_names = COMMON_NAMES + ("loldu_PL", "loldu_U", "loldu_z0", "loldu_fingerprint")

    def _create_containers(self) -> None:
        self.loldu_z = nn.ModuleDict()
        self.loldu_PL = FactorDict()
        self.loldu_U = FactorDict()
        self.loldu_z0 = BufferDict(persistent=True)
        self.loldu_fingerprint = BufferDict(persistent=True)

    @classmethod
    def base_weight_step(cls, config: LoLDUConfig) -> str:
        """LoLDU always reads the base weight (its LU factorization gives the frozen factors)."""
        return "LoLDU LU init"

    def create_adapter(self, adapter_name: str, config: LoLDUConfig) -> None:
        r = self.r[adapter_name]
        self.scaling[adapter_name] = config.alpha / r
        weight = read_weight(self)
        check_finite(
            weight, step=self.base_weight_step(config), statistic="base weight", layer=self.module_name
        )
        factors = ldu_factors(weight, r)
        self._warn_frozen_entries(factors.u_r, weight)
        z = initial_z(factors.d_r, config.init)
        z0 = z if config.init in BASE_START_INITS else factors.d_r
        if not config.init_weights:  # PEFT's convention: a random, non-identity start
            z = z + factors.d_r.abs() * torch.randn_like(z)
        self.loldu_z[adapter_name] = DiagonalScale(
            z, self.scaling[adapter_name] if config.train_sigma else None
        )
        self.loldu_PL.put(adapter_name, factors.pl_r, persistent=config.store_factors)
        self.loldu_U.put(adapter_name, factors.u_r, persistent=config.store_factors)
        self.loldu_z0[adapter_name] = z0.clone()
        self.loldu_fingerprint[adapter_name] = fingerprint(weight, factors.pivots)

    def _warn_frozen_entries(self, u_r: torch.Tensor, weight: torch.Tensor) -> None:
        """Warn when entries of ``z`` cannot train: a zero row of ``U_r`` gives them exactly zero gradient."""
        stuck = int((u_r == 0).all(dim=1).sum())
        if not stuck:
            return
        if not weight.any():
            detail = "the base weight is all zero, so the layer cannot train; leave it out of target_modules"
        else:
            detail = "the base weight is rank-deficient (zero pivots with nothing left to eliminate); lower r"
        warnings.warn(
            f"LoLDU layer '{self.module_name}': {stuck} of {u_r.shape[0]} entries of z cannot move (their "
            f"rows of U_r are zero, so they get exactly zero gradient): {detail}",
            UserWarning,
            stacklevel=4,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        """Refuse an adapter saved on another base weight (or another LU) before anything is copied."""
        for name in self.loldu_fingerprint:
            saved = state_dict.get(f"{prefix}loldu_fingerprint.{name}")
            if saved is None or f"{prefix}loldu_PL.{name}" in state_dict:
                continue  # no fingerprint saved, or the factors themselves are in the file
            own = self.loldu_fingerprint[name]
            if saved.shape != own.shape or not torch.equal(saved.to(own.device, own.dtype), own):
                which = "base weight" if not torch.equal(saved[:32].cpu(), own[:32].cpu()) else "LU pivoting"
                raise ValueError(
                    f"LoLDU adapter '{name}' of layer '{self.module_name}' was saved for a different "
                    f"{which}: its frozen factors are rebuilt from the base weight at load, so it must be "
                    "loaded onto the exact base model it was trained on (or saved with "
                    "LoLDUConfig(store_factors=True))."
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return self.loldu_z[adapter_name](
            x,
            self.loldu_U[adapter_name],
            self.loldu_PL[adapter_name],
            self.scaling[adapter_name],
            self.loldu_z0[adapter_name],
        )

    def frozen_factors(self, adapter_name: str):
        """``(U_r, z - z0, PL_r, s)`` (diagonal middle) for the fused kernels (``ortho_adapters.kernels``)."""
        m, s = self.loldu_z[adapter_name].middle(self.scaling[adapter_name], self.loldu_z0[adapter_name])
        return self.loldu_U[adapter_name], m, self.loldu_PL[adapter_name], s

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``PL_r diag(sigma z - sigma0 z0) U_r`` in fp32."""
        m, s = self.loldu_z[adapter_name].middle(self.scaling[adapter_name], self.loldu_z0[adapter_name])
        pl, u = self.loldu_PL[adapter_name].float(), self.loldu_U[adapter_name].float()
        return (pl * m.detach().float()) @ u * s
