"""LoRA-SB tuner layer: ``y = x W0^T + s ((x A^T)(R - R0)^T) B^T`` (arXiv 2411.19557, built on LoRA-XS)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..core.base_weight import read_weight
from ..core.layer import COMMON_NAMES, OrthoLayer
from ..core.leaf import MixingMatrix
from ..core.svd import truncated_svd
from .config import LoraSBConfig

# Attribute set on a base module by `initialize_lora_sb` before `get_peft_model`: (B, R, A) in fp32.
PENDING_FACTORS_ATTR = "_lora_sb_pending_factors"


class LoraSBLayer(OrthoLayer):
    """Frozen ``B`` (m x r) and ``A`` (r x n) as persistent buffers, trainable ``R`` (r x r) in a leaf module.

    ``R0`` (frozen) exists only with ``subtract_init=True`` and makes the start exactly the base model.
    """

    adapter_layer_names = ("lora_sb_R",)
    other_param_names = COMMON_NAMES + ("lora_sb_A", "lora_sb_B", "lora_sb_R0")

    def _create_containers(self) -> None:
        self.lora_sb_R = nn.ModuleDict()
        self.lora_sb_A = BufferDict(persistent=True)
        self.lora_sb_B = BufferDict(persistent=True)
        self.lora_sb_R0 = BufferDict(persistent=True)

    def create_adapter(self, adapter_name: str, config: LoraSBConfig) -> None:
        r = config.r
        self.scaling[adapter_name] = config.alpha / r
        self.lora_sb_R[adapter_name] = MixingMatrix(r)
        pending = self.get_base_layer().__dict__.pop(PENDING_FACTORS_ATTR, None)
        if config.init == "svd":
            u, s, vh = truncated_svd(read_weight(self), r)
            self._store(adapter_name, u * s, torch.zeros(r, r), vh, config.subtract_init)
        elif pending is not None:
            self.set_factors(adapter_name, *pending, subtract_init=config.subtract_init)
        else:
            if not config.inference_mode:
                warnings.warn(
                    f"LoRA-SB layer '{self.module_name}' has init='gradient' but no gradient factors yet: "
                    "B, A and R are zero until `ortho_adapters.initialize_lora_sb(model, dataloader)` runs "
                    "or a saved adapter is loaded.",
                    stacklevel=2,
                )
            zeros = torch.zeros
            b, a = zeros(self.out_features, r), zeros(r, self.in_features)
            self._store(adapter_name, b, zeros(r, r), a, config.subtract_init)

    def _store(self, name: str, b: torch.Tensor, rmat: torch.Tensor, a: torch.Tensor, subtract: bool) -> None:
        self.lora_sb_B[name] = b.detach().to(torch.float32).contiguous()
        self.lora_sb_A[name] = a.detach().to(torch.float32).contiguous()
        weight = self.lora_sb_R[name].weight
        weight.data = (rmat.detach().to(torch.float32) / self.scaling[name]).to(weight.device)
        if subtract:
            self.lora_sb_R0[name] = weight.data.clone()

    def set_factors(
        self,
        adapter_name: str,
        b: torch.Tensor,
        rmat: torch.Tensor,
        a: torch.Tensor,
        subtract_init: bool,
    ) -> None:
        """Install gradient-init factors so that ``s B R A == b @ rmat @ a`` (shapes are validated)."""
        r = self.r[adapter_name]
        expected = {"B": (self.out_features, r), "R": (r, r), "A": (r, self.in_features)}
        for label, tensor in zip("BRA", (b, rmat, a)):
            if tuple(tensor.shape) != expected[label]:
                raise ValueError(
                    f"LoRA-SB factor {label} for '{self.module_name}' has shape {tuple(tensor.shape)}, "
                    f"expected {expected[label]}"
                )
        device = self.lora_sb_R[adapter_name].weight.device
        self._store(adapter_name, b.to(device), rmat.to(device), a.to(device), subtract_init)

    def _offset(self, adapter_name: str) -> Optional[torch.Tensor]:
        return self.lora_sb_R0[adapter_name] if adapter_name in self.lora_sb_R0 else None

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_sb_R[adapter_name](
            x,
            self.lora_sb_A[adapter_name],
            self.lora_sb_B[adapter_name],
            self.scaling[adapter_name],
            self._offset(adapter_name),
        )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B (R - R0) A`` in fp32."""
        rmat, s = self.lora_sb_R[adapter_name].middle(self.scaling[adapter_name], self._offset(adapter_name))
        return (self.lora_sb_B[adapter_name] @ rmat.detach().float() @ self.lora_sb_A[adapter_name]) * s
