"""FedSVD tuner layer: ``y = x W0^T + s (x A^T) B^T`` (arXiv 2505.12805).

``A`` (r x n, orthonormal rows) is a frozen persistent buffer; ``B`` (m x r, zero at init) is the weight
of a plain ``nn.Linear(r, m, bias=False)`` leaf applied to ``u = x A^T``. Plain autograd keeps only ``u``
(T x r) for backward (``A`` is frozen, so ``x A^T`` saves no ``x``), and Opacus' grad sampler for
``nn.Linear`` gives exact per-sample gradients of ``B`` from ``u`` and the output gradient.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..core.layer import COMMON_NAMES, OrthoLayer
from ..core.orthonormal import layer_seed, random_orthonormal_rows
from .config import FedSVDConfig


class FedSVDLayer(OrthoLayer):
    """Frozen ``A`` (r x n) in a persistent ``BufferDict``; trainable ``B`` as an ``nn.Linear(r, m)`` leaf."""

    adapter_layer_names = ("fedsvd_B",)
    other_param_names = COMMON_NAMES + ("fedsvd_A",)

    def _create_containers(self) -> None:
        self.fedsvd_B = nn.ModuleDict()
        self.fedsvd_A = BufferDict(persistent=True)

    def create_adapter(self, adapter_name: str, config: FedSVDConfig) -> None:
        r = self.r[adapter_name]
        self.scaling[adapter_name] = config.alpha / r
        seed = layer_seed(config.init_seed, f"{self.module_name}.{adapter_name}")
        self.fedsvd_A[adapter_name] = random_orthonormal_rows(r, self.in_features, seed)
        leaf = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32)
        if config.init_weights:
            nn.init.zeros_(leaf.weight)  # B = 0: exactly the base model
        else:  # PEFT's convention: a random, non-identity start (seeded, global RNG untouched)
            g = torch.Generator(device="cpu").manual_seed(seed + 1)
            leaf.weight.copy_(torch.randn(self.out_features, r, generator=g) * 0.1)
        self.fedsvd_B[adapter_name] = leaf

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s (x A^T) B^T``; under autocast both matmuls run in the autocast dtype."""
        a = self.fedsvd_A[adapter_name]
        u = x @ a.t()  # x is already in A's dtype, or autocast casts both
        return self.fedsvd_B[adapter_name](u) * self.scaling[adapter_name]

    def frozen_factors(self, adapter_name: str):
        """``(A, None, B, s)`` (identity middle) for the fused kernels (``ortho_adapters.kernels``)."""
        return (
            self.fedsvd_A[adapter_name],
            None,
            self.fedsvd_B[adapter_name].weight,
            self.scaling[adapter_name],
        )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s B A`` in fp32."""
        b = self.fedsvd_B[adapter_name].weight.detach().float()
        return (b @ self.fedsvd_A[adapter_name].float()) * self.scaling[adapter_name]
