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
from ..core.zero3 import write_parameter
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

    @classmethod
    def base_weight_step(cls, config: LoraSBConfig) -> Optional[str]:
        """``init="svd"`` reads the base weight (its truncated SVD gives ``B`` and ``A``)."""
        return "LoRA-SB init='svd'" if config.init == "svd" else None

    def create_adapter(self, adapter_name: str, config: LoraSBConfig) -> None:
        r = self.r[adapter_name]
        self.scaling[adapter_name] = config.alpha / r
        pending = self.get_base_layer().__dict__.pop(PENDING_FACTORS_ATTR, None)
        if config.init == "svd":
            step = self.base_weight_step(config)
            u, s, vh = truncated_svd(
                read_weight(self), r, step=step, statistic="base weight", layer=self.module_name
            )
            b, rmat, a = u * s, torch.zeros(r, r), vh
        elif pending is not None:
            b, rmat, a = self._checked(adapter_name, *pending)
        else:
            if not config.inference_mode:
                warnings.warn(
                    f"LoRA-SB layer '{self.module_name}' has init='gradient' but no gradient factors yet: "
                    "B, A and R are zero until `ortho_adapters.initialize_lora_sb(model, dataloader)` runs "
                    "or a saved adapter is loaded.",
                    stacklevel=2,
                )
            b, rmat, a = (
                torch.zeros(self.out_features, r),
                torch.zeros(r, r),
                torch.zeros(r, self.in_features),
            )
        self.lora_sb_B[adapter_name] = b.detach().to(torch.float32).contiguous()
        self.lora_sb_A[adapter_name] = a.detach().to(torch.float32).contiguous()
        stored = rmat.detach().to(torch.float32) / self.scaling[adapter_name]
        if config.subtract_init:
            self.lora_sb_R0[adapter_name] = stored.clone()
        if not config.init_weights:  # PEFT's convention: a random, non-identity start
            stored = stored + torch.randn(r, r) * (0.1 / self.scaling[adapter_name])
        self.lora_sb_R[adapter_name] = MixingMatrix(stored)

    def _checked(self, adapter_name: str, b: torch.Tensor, rmat: torch.Tensor, a: torch.Tensor):
        """Validate the shapes of gradient-init factors ``(B, R, A)`` for this layer and adapter."""
        r = self.r[adapter_name]
        expected = {"B": (self.out_features, r), "R": (r, r), "A": (r, self.in_features)}
        for label, tensor in zip("BRA", (b, rmat, a)):
            if tuple(tensor.shape) != expected[label]:
                raise ValueError(
                    f"LoRA-SB factor {label} for '{self.module_name}' has shape {tuple(tensor.shape)}, "
                    f"expected {expected[label]}"
                )
        return b, rmat, a

    @torch.no_grad()
    def set_factors(
        self,
        adapter_name: str,
        b: torch.Tensor,
        rmat: torch.Tensor,
        a: torch.Tensor,
        subtract_init: bool,
    ) -> None:
        """Install gradient-init factors so that ``s B R A == b @ rmat @ a`` (shapes are validated).

        ``R`` is updated in place (an optimizer holding it keeps working); ``B``, ``A`` keep their dtype.
        """
        b, rmat, a = self._checked(adapter_name, b, rmat, a)
        weight = self.lora_sb_R[adapter_name].weight
        stored = rmat.to(weight.device, torch.float32) / self.scaling[adapter_name]
        write_parameter(weight, stored)  # also a ZeRO-3 partition and a ZeRO optimizer's fp32 copy
        for container, value in ((self.lora_sb_B, b), (self.lora_sb_A, a)):
            old = container[adapter_name]
            container[adapter_name] = value.detach().to(old.device, old.dtype).contiguous()
        if subtract_init:
            self.lora_sb_R0[adapter_name] = stored.to(weight.dtype).clone()
        elif adapter_name in self.lora_sb_R0:
            del self.lora_sb_R0[adapter_name]

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

    def frozen_factors(self, adapter_name: str):
        """``(A, R - R0, B, s)``: the update as the fused kernels take it (``ortho_adapters.kernels``)."""
        rmat, s = self.lora_sb_R[adapter_name].middle(self.scaling[adapter_name], self._offset(adapter_name))
        return self.lora_sb_A[adapter_name], rmat, self.lora_sb_B[adapter_name], s

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B (R - R0) A`` in fp32."""
        rmat, s = self.lora_sb_R[adapter_name].middle(self.scaling[adapter_name], self._offset(adapter_name))
        b, a = self.lora_sb_B[adapter_name].float(), self.lora_sb_A[adapter_name].float()
        return (b @ rmat.detach().float() @ a) * s
