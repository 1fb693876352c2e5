"""O3 tuner layer: one LoRA per unlearning request, summed and scaled per sample by the OOD gate.

``y = x W0^T + w(x) * s * sum_t (x A_t^T) B_t^T`` (arXiv 2407.10223). The newest request's ``A_t`` (r x n)
and ``B_t`` (m x r) are the trainable leaf ``o3_lora``; earlier requests' factors are frozen persistent
buffers ``o3_frozen_A`` (k x r x n) and ``o3_frozen_B`` (k x m x r). ``w`` (one value per sample, in [0, 1])
comes from the model's shared :class:`~ortho_adapters.o3.gate.GateState`; without gate weights ``w = 1``.
A sample with ``w = 0`` gets exactly the base output (``base + 0``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..core.layer import COMMON_NAMES, OrthoLayer
from ..core.orthonormal import layer_seed
from .config import O3Config


class O3Leaf(nn.Module):
    """The trainable LoRA of the current request: ``lora_B(lora_A(x))`` (no scaling)."""

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=torch.float32)

    def reset(self, seed: int, zero_b: bool) -> None:
        """PEFT LoRA's init, private generator: ``A ~ U(-1/sqrt(n), 1/sqrt(n))``, ``B = 0`` (or small)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        n = self.lora_A.in_features
        with torch.no_grad():
            a = (torch.rand(self.lora_A.weight.shape, generator=g) * 2 - 1) / math.sqrt(n)
            self.lora_A.weight.copy_(a)
            if zero_b:
                self.lora_B.weight.zero_()
            else:
                self.lora_B.weight.copy_(torch.randn(self.lora_B.weight.shape, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))


class O3Layer(OrthoLayer):
    """Current request's LoRA as a trainable leaf, earlier requests' LoRAs as frozen stacked buffers."""

    adapter_layer_names = ("o3_lora",)
    other_param_names = COMMON_NAMES + ("o3_frozen_A", "o3_frozen_B", "requests", "init_seed")

    # set by O3Model after injection: the model's shared gate state (a plain object, never saved)
    o3_gate_state: Optional[Any] = None

    def _create_containers(self) -> None:
        self.o3_lora = nn.ModuleDict()
        self.o3_frozen_A = BufferDict(persistent=True)
        self.o3_frozen_B = BufferDict(persistent=True)
        self.requests: dict[str, int] = {}
        self.init_seed: dict[str, int] = {}

    def create_adapter(self, adapter_name: str, config: O3Config) -> None:
        r = self.r[adapter_name]
        self.scaling[adapter_name] = config.alpha / r
        frozen = max(len(config.requests) - 1, 0)
        self.requests[adapter_name] = frozen + 1
        self.init_seed[adapter_name] = config.init_seed
        if frozen:  # filled from the saved adapter
            self.o3_frozen_A[adapter_name] = torch.zeros(frozen, r, self.in_features)
            self.o3_frozen_B[adapter_name] = torch.zeros(frozen, self.out_features, r)
        leaf = O3Leaf(self.in_features, self.out_features, r)
        leaf.reset(self._seed(adapter_name, frozen), zero_b=config.init_weights)
        self.o3_lora[adapter_name] = leaf

    def _seed(self, adapter_name: str, request_index: int) -> int:
        return layer_seed(self.init_seed[adapter_name] + request_index, f"{self.module_name}.{adapter_name}")

    # ----- requests --------------------------------------------------------------------------------
    def request_stacks(self, adapter_name: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(A, B)`` stacks of the earlier requests (k x r x n, k x m x r), or ``(None, None)``."""
        if adapter_name not in self.o3_frozen_A:
            return None, None
        return self.o3_frozen_A[adapter_name], self.o3_frozen_B[adapter_name]

    def start_request(self, adapter_name: str) -> None:
        """Freeze the current request's ``(A, B)`` into the buffers and start a fresh LoRA (B = 0)."""
        leaf = self.o3_lora[adapter_name]
        a = leaf.lora_A.weight.detach().clone().unsqueeze(0)
        b = leaf.lora_B.weight.detach().clone().unsqueeze(0)
        old_a, old_b = self.request_stacks(adapter_name)
        if old_a is not None:
            a = torch.cat([old_a, a.to(old_a)])
            b = torch.cat([old_b, b.to(old_b)])
        self.o3_frozen_A[adapter_name] = a
        self.o3_frozen_B[adapter_name] = b
        leaf.reset(self._seed(adapter_name, a.shape[0]), zero_b=True)
        self.requests[adapter_name] = a.shape[0] + 1

    # ----- forward ---------------------------------------------------------------------------------
    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s * sum_t (x A_t^T) B_t^T`` over every request (frozen ones as one stacked matmul)."""
        s = self.scaling[adapter_name]
        out = self.o3_lora[adapter_name](x)
        a, b = self.request_stacks(adapter_name)
        if a is not None:
            k, r, n = a.shape
            u = x @ a.reshape(k * r, n).t()  # x is in the buffers' dtype, or autocast casts both
            out = out + u @ b.permute(1, 0, 2).reshape(b.shape[1], k * r).t()
        return out * s

    def sample_weights(self, adapter_name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample weights ``w`` shaped to broadcast over ``x``'s trailing dims, or ``None`` (w = 1)."""
        state = self.o3_gate_state
        if state is None:
            return None
        w = state.weights_for(adapter_name)
        if w is None:
            return None
        if w.shape[0] != x.shape[0]:
            raise ValueError(
                f"O3 gate has {w.shape[0]} sample weights but layer '{self.module_name}' got a batch of "
                f"{x.shape[0]}; set the gate inputs for this exact batch"
            )
        return w.to(device=x.device).view(-1, *([1] * (x.dim() - 1)))

    # ----- merge -----------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * sum_t B_t A_t`` in fp32."""
        leaf = self.o3_lora[adapter_name]
        delta = leaf.lora_B.weight.detach().float() @ leaf.lora_A.weight.detach().float()
        a, b = self.request_stacks(adapter_name)
        if a is not None:
            delta = delta + torch.einsum("kmr,krn->mn", b.float(), a.float())
        return delta * self.scaling[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge (only possible without a calibrated gate: a per-sample weight cannot live in W)."""
        state = self.o3_gate_state
        names = adapter_names if adapter_names is not None else self.active_adapters
        if state is not None and any(state.is_gated(n) for n in names):
            raise ValueError(
                "cannot merge a gated O3 adapter: its contribution is scaled per sample by the OOD gate; "
                "set config.gate=False (or delete the gate) to merge the plain sum of LoRAs"
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
