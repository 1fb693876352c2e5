"""LoLDU tuner layer: ``y = x W0^T + sigma0 ((x U_r^T) * (z - z0)) PL_r^T`` (arXiv 2410.13618)."""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..core.base_weight import read_weight
from ..core.layer import COMMON_NAMES, OrthoLayer
from ..core.leaf import DiagonalScale
from .config import BASE_START_INITS, LoLDUConfig
from .decomposition import truncated_ldu


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
    """Frozen ``PL_r`` (m x r), ``U_r`` (r x n), ``z0`` (r) as persistent buffers; trainable ``z`` in a leaf.

    The update is ``delta = PL_r diag(sigma z - sigma0 z0) U_r`` (``sigma = sigma0`` unless ``train_sigma``),
    computed as ``((x U_r^T) * diag) PL_r^T``: ``r (m + n)`` multiply-adds per token, ``u = x U_r^T`` (T x r)
    saved for backward. ``z0`` is the initial ``z`` for the base-start inits and ``d_r`` for the others.
    """

    adapter_layer_names = ("loldu_z",)
    other_param_names = COMMON_NAMES + ("loldu_PL", "loldu_U", "loldu_z0")

    def _create_containers(self) -> None:
        self.loldu_z = nn.ModuleDict()
        self.loldu_PL = BufferDict(persistent=True)
        self.loldu_U = BufferDict(persistent=True)
        self.loldu_z0 = BufferDict(persistent=True)

    def create_adapter(self, adapter_name: str, config: LoLDUConfig) -> None:
        r = config.r
        self.scaling[adapter_name] = config.alpha / r
        pl_r, u_r, d_r = truncated_ldu(read_weight(self), r)
        z = initial_z(d_r, config.init)
        leaf = DiagonalScale(r, self.scaling[adapter_name] if config.train_sigma else None)
        leaf.weight.data = z.contiguous()
        self.loldu_z[adapter_name] = leaf
        self.loldu_PL[adapter_name] = pl_r
        self.loldu_U[adapter_name] = u_r
        self.loldu_z0[adapter_name] = (z if config.init in BASE_START_INITS else d_r).clone()

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return self.loldu_z[adapter_name](
            x,
            self.loldu_U[adapter_name],
            self.loldu_PL[adapter_name],
            self.scaling[adapter_name],
            self.loldu_z0[adapter_name],
        )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``PL_r diag(sigma z - sigma0 z0) U_r`` in fp32."""
        m, s = self.loldu_z[adapter_name].middle(self.scaling[adapter_name], self.loldu_z0[adapter_name])
        return (self.loldu_PL[adapter_name] * m.detach().float()) @ self.loldu_U[adapter_name] * s
