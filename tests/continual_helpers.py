"""Shared by the continual-LoRA tests and the scripts they run in fresh processes (``continual_resume.py``,
``continual_ddp_check.py``): a seeded wide MLP, per-task data lying in low-dimensional input subspaces, and a
deterministic AdamW task loop."""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch import nn

from ortho_adapters import OrthoLoraConfig
from ortho_adapters.continual import end_task, olora_penalty, start_task

N_IN, N_HID, N_OUT = 32, 48, 3


class WideMLP(nn.Module):
    """``forward(x, labels=None)`` -> dict(logits[, loss]); lin0 32->48, lin1 48->48, head 48->3."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(N_IN, N_HID)
        self.lin1 = nn.Linear(N_HID, N_HID)
        self.head = nn.Linear(N_HID, N_OUT)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def base_model(seed: int = 0) -> WideMLP:
    torch.manual_seed(seed)
    return WideMLP().eval()


def make_model(mode: str = "subspace", **overrides) -> nn.Module:
    kwargs = {"target_modules": ["lin0", "lin1"], "r": 4, "mode": mode, "energy": [0.97, 0.99], **overrides}
    return get_peft_model(base_model(), OrthoLoraConfig(**kwargs))


def task_batches(task: int, n_batches: int = 4, batch: int = 32, dim: int = 3, seed: int = 0) -> list[dict]:
    """Task ``task``'s data: inputs in a random ``dim``-dim subspace of R^32, labels from a random rule."""
    g = torch.Generator().manual_seed(1000 * task + seed)
    basis = torch.randn(dim, N_IN, generator=g)
    rule = torch.randn(dim, N_OUT, generator=g)
    out = []
    for _ in range(n_batches):
        z = torch.randn(batch, dim, generator=g)
        out.append({"x": z @ basis, "labels": (z @ rule).argmax(-1)})
    return out


def train_task(
    model: nn.Module, batches: list[dict], steps: int = 30, lr: float = 1e-2, seed: int = 0
) -> None:
    """AdamW (weight decay 0.01) on the current task's trainable tensors, O-LoRA penalty included."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    continual = isinstance(model.peft_config[model.active_adapter], OrthoLoraConfig)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch)["loss"]
        if continual:
            loss = loss + olora_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def inputs_only(batches: list[dict]) -> list[dict]:
    return [{"x": b["x"]} for b in batches]


def run_task(model: nn.Module, name: str, task: int, mode: str) -> None:
    """``start_task`` (with the task's data in subspace mode) -> train -> ``end_task``."""
    data = task_batches(task)
    start_task(model, name, inputs_only(data) if mode == "subspace" else None)
    train_task(model, data, seed=task)
    end_task(model, inputs_only(data))
