"""Orthogonal continual LoRA tuner layer: ``y = x W0^T + s * sum_t (x A_t^T) B_t^T``.

Per adapter the layer keeps the current task's factors and the earlier tasks' factors stacked:

* ``ortho_lora_B`` (ModuleDict): the current task's ``B`` (m x r) as an ``nn.Linear(r, m)`` leaf (trains);
* ``ortho_lora_A`` (ModuleDict, olora mode): the current ``A`` (r x n), an ``nn.Linear(n, r)`` leaf (trains);
* ``ortho_lora_A_fixed`` (BufferDict, subspace / gradient / scaled modes): the current ``A``, frozen
  (orthonormal rows in the exact modes; ``V^T P`` in scaled mode);
* ``ortho_lora_A_old`` / ``ortho_lora_B_old`` (BufferDicts): ``[A_1; ...; A_{T-1}]`` ((T-1) r x n) and
  ``[B_1, ..., B_{T-1}]`` (m x (T-1) r), so the frozen tasks' sum is one product ``B_old A_old``;
* ``ortho_lora_M`` (structural modes, after the first ``end_task``): the union ``M`` (n x k) of the finished
  tasks' input bases. ``k`` differs per layer, so this container takes the saved tensor's width at load;
* ``ortho_lora_lam`` (scaled mode, after the first ``end_task``): the importance ``lambda`` (k,) of ``M``'s
  columns, also width-flexible.

How many old tasks exist is read from the config (``task_names``), so a fresh model built from a saved
``adapter_config.json`` has the shapes the saved tensors need.
"""

from __future__ import annotations

import math

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..core.layer import COMMON_NAMES, OrthoLayer
from ..core.orthonormal import layer_seed, random_orthonormal_rows
from .config import OrthoLoraConfig


def task_seed(seed: int, module_name: str, task: int) -> int:
    """A seed for (layer, task): ``seed`` mixed with a stable hash of the layer's name and the task index."""
    return layer_seed(seed, f"{module_name}#{task}")


class WidthFlexibleBufferDict(BufferDict):
    """A persistent ``BufferDict`` whose entries take the width (last dim) of the tensor being loaded."""

    def __init__(self) -> None:
        super().__init__(persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for key, buf in list(self._buffers.items()):
            incoming = state_dict.get(prefix + key)
            if buf is not None and incoming is not None and incoming.shape[:-1] == buf.shape[:-1]:
                if incoming.shape != buf.shape:
                    self._buffers[key] = torch.zeros(incoming.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def kaiming_rows(r: int, n: int, seed: int) -> torch.Tensor:
    """LoRA's ``A`` init (``kaiming_uniform_(a=sqrt(5))`` of ``nn.Linear(n, r)``) from a private generator."""
    bound = 1.0 / math.sqrt(n)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(r, n, generator=g) * 2 - 1) * bound


class OrthoLoraLayer(OrthoLayer):
    """Every task's low-rank update in one adapter (see module docstring)."""

    adapter_layer_names = ("ortho_lora_B", "ortho_lora_A")
    other_param_names = COMMON_NAMES + (
        "ortho_lora_A_fixed",
        "ortho_lora_A_old",
        "ortho_lora_B_old",
        "ortho_lora_M",
        "ortho_lora_lam",
    )

    def _create_containers(self) -> None:
        self.ortho_lora_B = nn.ModuleDict()
        self.ortho_lora_A = nn.ModuleDict()
        self.ortho_lora_A_fixed = BufferDict(persistent=True)
        self.ortho_lora_A_old = BufferDict(persistent=True)
        self.ortho_lora_B_old = BufferDict(persistent=True)
        self.ortho_lora_M = WidthFlexibleBufferDict()
        self.ortho_lora_lam = WidthFlexibleBufferDict()

    def create_adapter(self, adapter_name: str, config: OrthoLoraConfig) -> None:
        n, m = self.in_features, self.out_features
        self.scaling[adapter_name] = config.alpha / self.r[adapter_name]  # alpha / config.r for every task
        current = max(len(config.task_names) - 1, 0)  # index of the current task slot
        if config.task_ranks:  # every scheduled rank must fit the layer, not only the first
            self.check_rank(max(config.task_ranks), m, n, self.module_name)
        r = config.rank_for_task(current)
        seed = task_seed(config.init_seed, f"{self.module_name}.{adapter_name}", current)
        if config.structural:
            self.ortho_lora_A_fixed[adapter_name] = random_orthonormal_rows(r, n, seed)
        else:
            self.ortho_lora_A[adapter_name] = self._a_leaf(kaiming_rows(r, n, seed))
        leaf = nn.Linear(r, m, bias=False, dtype=torch.float32)
        if config.init_weights:
            nn.init.zeros_(leaf.weight)  # B = 0: the new task starts exactly where the model was
        else:  # PEFT's convention: a random, non-identity start (seeded, global RNG untouched)
            g = torch.Generator(device="cpu").manual_seed(seed + 1)
            leaf.weight.copy_(torch.randn(m, r, generator=g) * 0.1)
        self.ortho_lora_B[adapter_name] = leaf
        old = config.num_old_tasks
        if old:  # placeholders with the saved shapes; PEFT's state-dict load fills them
            rows = config.old_rows(old)
            self.ortho_lora_A_old[adapter_name] = torch.zeros(rows, n)
            self.ortho_lora_B_old[adapter_name] = torch.zeros(m, rows)
        if config.structural and config.tasks_ended:
            self.ortho_lora_M[adapter_name] = torch.zeros(n, 0)
            if config.mode == "scaled":
                self.ortho_lora_lam[adapter_name] = torch.zeros(0)

    @staticmethod
    def _a_leaf(a: torch.Tensor) -> nn.Linear:
        leaf = nn.Linear(a.shape[1], a.shape[0], bias=False, dtype=torch.float32)
        with torch.no_grad():
            leaf.weight.copy_(a)
        return leaf

    # ----- factors --------------------------------------------------------------------------------
    def current_a(self, adapter_name: str) -> torch.Tensor:
        """The current task's ``A`` (r x n): the frozen buffer (subspace) or the trainable leaf (olora)."""
        if adapter_name in self.ortho_lora_A_fixed:
            return self.ortho_lora_A_fixed[adapter_name]
        return self.ortho_lora_A[adapter_name].weight

    def basis(self, adapter_name: str) -> torch.Tensor | None:
        """``M`` (n x k) of the finished tasks (structural modes), or None before the first ``end_task``."""
        return self.ortho_lora_M[adapter_name] if adapter_name in self.ortho_lora_M else None

    def importance(self, adapter_name: str) -> torch.Tensor | None:
        """``lambda`` (k,) of ``M``'s columns (scaled mode), or None before the first ``end_task``."""
        return self.ortho_lora_lam[adapter_name] if adapter_name in self.ortho_lora_lam else None

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s ((x A_t^T) B_t^T + (x A_old^T) B_old^T)``; under autocast the matmuls run in its dtype."""
        if adapter_name in self.ortho_lora_A_fixed:
            u = x @ self.ortho_lora_A_fixed[adapter_name].t()
        else:  # the trainable leaf is called, so that DeepSpeed ZeRO-3 gathers its weight for it
            u = self.ortho_lora_A[adapter_name](x)
        y = self.ortho_lora_B[adapter_name](u)
        if adapter_name in self.ortho_lora_A_old:
            y = y + (x @ self.ortho_lora_A_old[adapter_name].t()) @ self.ortho_lora_B_old[adapter_name].t()
        return y * self.scaling[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s (B_t A_t + B_old A_old)`` in fp32."""
        delta = (
            self.ortho_lora_B[adapter_name].weight.detach().float()
            @ self.current_a(adapter_name).detach().float()
        )
        if adapter_name in self.ortho_lora_A_old:
            delta = (
                delta
                + self.ortho_lora_B_old[adapter_name].float() @ self.ortho_lora_A_old[adapter_name].float()
            )
        return delta * self.scaling[adapter_name]

    # ----- lifecycle steps (called by ortho_adapters.continual.lifecycle) ---------------------------
    @torch.no_grad()
    def push_task(self, adapter_name: str, new_a: torch.Tensor, trainable: bool) -> None:
        """Freeze the current task into the old stacks; open a new slot with ``A = new_a`` and ``B = 0``."""
        b_leaf = self.ortho_lora_B[adapter_name]
        dtype, device = b_leaf.weight.dtype, b_leaf.weight.device
        a_cur = self.current_a(adapter_name).detach().to(dtype)
        b_cur = b_leaf.weight.detach()
        if adapter_name in self.ortho_lora_A_old:
            a_cur = torch.cat([self.ortho_lora_A_old[adapter_name], a_cur], dim=0)
            b_cur = torch.cat([self.ortho_lora_B_old[adapter_name], b_cur], dim=1)
        self.ortho_lora_A_old[adapter_name] = a_cur.clone()
        self.ortho_lora_B_old[adapter_name] = b_cur.clone()
        new_b = nn.Linear(new_a.shape[0], self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(new_b.weight)
        new_b.requires_grad_(trainable)
        self.ortho_lora_B[adapter_name] = new_b
        new_a = new_a.to(device=device, dtype=dtype)
        if adapter_name in self.ortho_lora_A_fixed:
            self.ortho_lora_A_fixed[adapter_name] = new_a.contiguous()
        else:
            leaf = self._a_leaf(new_a.float()).to(device=device, dtype=dtype)
            leaf.requires_grad_(trainable)
            self.ortho_lora_A[adapter_name] = leaf

    def replace_current_a(self, adapter_name: str, new_a: torch.Tensor) -> None:
        """Set the (untrained, structural-mode) current ``A`` -- used when the first task brings data."""
        old = self.ortho_lora_A_fixed[adapter_name]
        self.ortho_lora_A_fixed[adapter_name] = new_a.to(device=old.device, dtype=old.dtype).contiguous()

    def set_basis(self, adapter_name: str, m: torch.Tensor, lam: torch.Tensor | None = None) -> None:
        """Store ``M`` (n x k) and (scaled mode) its importance ``lam`` (k,), fp32, on the layer's device."""
        device = self.ortho_lora_B[adapter_name].weight.device
        self.ortho_lora_M[adapter_name] = m.to(device=device, dtype=torch.float32).contiguous()
        if lam is not None:
            self.ortho_lora_lam[adapter_name] = lam.to(device=device, dtype=torch.float32).contiguous()

    def freeze_current(self, adapter_name: str) -> None:
        """Stop the current task's factors from training (``end_task``)."""
        for container in (self.ortho_lora_B, self.ortho_lora_A):
            if adapter_name in container:
                container[adapter_name].requires_grad_(False)
