"""LoRA-SB gradient initialization (arXiv 2411.19557, Sec. 3).

Accumulate the gradient ``G`` of the loss w.r.t. each TARGET weight only (fp32, from hooks:
``G = sum_tokens dy^T x``; no other parameter's gradient is kept), form the estimated first update
``dW = -eta * sign(G)`` (Adam's first step; ``update="grad"`` uses ``-eta * G / ||G||_F``), take its
truncated SVD ``U_r S_r V_r^T`` and set ``B = U_r``, ``A = V_r^T``, ``R = diag(S_r)``, so that
``s B R A`` is the best rank-r approximation of ``dW`` and ``B``, ``A`` are orthonormal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack, nullcontext
from typing import Any, Literal, Optional

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from tqdm.auto import tqdm

from ..core.layer import is_supported_base
from ..core.svd import truncated_svd
from .config import LoraSBConfig
from .layer import PENDING_FACTORS_ATTR, LoraSBLayer


class _GradientAccumulator:
    """Sums ``dy^T x`` (fp32) for each watched module through forward + tensor hooks."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach()

            def grad_hook(grad: torch.Tensor) -> None:
                g = grad.reshape(-1, grad.shape[-1]).float()
                contribution = g.t() @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
                if name in self.sums:
                    self.sums[name] += contribution
                else:
                    self.sums[name] = contribution

            output.register_hook(grad_hook)

        return forward_hook

    def __enter__(self) -> _GradientAccumulator:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def _require_grad_path(model: nn.Module, modules: Iterable[nn.Module], stack: ExitStack) -> None:
    """Make sure the targets' outputs require grad without training anything.

    Uses the input embeddings' output when the model has them (no weight gradient is formed at all),
    otherwise temporarily sets ``requires_grad`` on the float target weights.
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = None
    if callable(get_embeddings):
        try:
            embeddings = get_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
    if isinstance(embeddings, nn.Module):
        handle = embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        stack.callback(handle.remove)
        return
    for module in modules:
        weight = module.weight
        if not weight.is_floating_point():
            raise ValueError(
                "initialize_lora_sb needs either input embeddings (get_input_embeddings) or float target "
                f"weights to build a gradient path; got a {type(module).__name__} with {weight.dtype} weight"
            )
        if not weight.requires_grad:
            weight.requires_grad_(True)
            stack.callback(weight.requires_grad_, False)


def _find_targets(model: nn.Module, config: Optional[LoraSBConfig], adapter_name: Optional[str]):
    """Map module name -> (base module, LoRA-SB layer or None)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraSBLayer)}
    if layers:
        return {n: (m.get_base_layer(), m) for n, m in layers.items() if adapter_name in m.lora_sb_R}
    if config is None:
        raise ValueError(
            "initialize_lora_sb on a model without LoRA-SB layers needs `config=LoraSBConfig(...)`"
        )
    targets = {
        n: (m, None)
        for n, m in model.named_modules()
        if is_supported_base(m) and check_target_module_exists(config, n)
    }
    if not targets:
        raise ValueError(f"No module of the model matches target_modules={config.target_modules!r}")
    return targets


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else 1


def _run_batches(model: nn.Module, dataloader: Iterable, num_samples: Optional[int], progress: bool) -> int:
    device = next(model.parameters()).device
    seen = 0
    total = num_samples
    with tqdm(total=total, desc="LoRA-SB gradient init", unit="sample", disable=not progress) as bar:
        for batch in dataloader:
            if isinstance(batch, dict):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                out = model(**batch)
            else:
                out = model(batch.to(device))
            loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else out.loss
            loss.backward()
            n = _batch_size(batch)
            seen += n
            bar.update(n)
            if num_samples is not None and seen >= num_samples:
                break
    if seen == 0:
        raise ValueError("initialize_lora_sb got an empty dataloader")
    return seen


def estimate_update(grad: torch.Tensor, lr: float, update: str) -> torch.Tensor:
    """First-step update estimate: ``-lr * sign(G)`` ("sign", Adam's first step) or ``-lr * G/||G||_F``."""
    if update == "sign":
        return -lr * torch.sign(grad)
    if update == "grad":
        return -lr * grad / grad.norm().clamp_min(torch.finfo(grad.dtype).tiny)
    raise ValueError(f"update must be 'sign' or 'grad', got {update!r}")


def initialize_lora_sb(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    train_step: Optional[Callable[[], None]] = None,
    *,
    config: Optional[LoraSBConfig] = None,
    num_samples: Optional[int] = 64,
    lr: float = 1e-3,
    update: Literal["sign", "grad"] = "sign",
    adapter_name: str = "default",
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Compute LoRA-SB's gradient-derived ``(B, R, A)`` for every target layer and install them.

    Args:
        model: a PEFT model with LoRA-SB layers (the factors of ``adapter_name`` are replaced in place), or a
            plain model together with ``config`` (the factors are kept on the target modules and used by the
            next ``get_peft_model(model, config)`` with ``init="gradient"``).
        dataloader: batches (dicts passed as ``model(**batch)`` whose output has ``loss``, or tensors
            whose output has ``loss``); iterated until ``num_samples`` examples (``None``: all).
        train_step: alternatively a callable that runs forward and ``backward()`` itself, called once.
        lr: ``eta`` of the update estimate (the learning rate of the first optimizer step).
        update: ``"sign"`` (Adam's first step, the paper's choice) or ``"grad"``.

    Only the target weights' gradients are accumulated (fp32); the SVD runs in fp32 without touching
    the global RNG. Parameters' ``.grad`` are cleared afterwards. Returns ``{module name: (B, R, A)}``.
    """
    if (dataloader is None) == (train_step is None):
        raise ValueError("initialize_lora_sb needs exactly one of `dataloader` or `train_step`")
    if update not in ("sign", "grad"):
        raise ValueError(f"update must be 'sign' or 'grad', got {update!r}")
    targets = _find_targets(model, config, adapter_name)
    if not targets:
        raise ValueError(f"No LoRA-SB layer carries adapter '{adapter_name}'")
    bases = {name: base for name, (base, _) in targets.items()}
    peft_layers = [layer for _, layer in targets.values() if layer is not None]
    disable = model.disable_adapter() if peft_layers and hasattr(model, "disable_adapter") else nullcontext()

    with ExitStack() as stack:
        stack.enter_context(disable)
        _require_grad_path(model, bases.values(), stack)
        accumulator = stack.enter_context(_GradientAccumulator(bases))
        if dataloader is not None:
            _run_batches(model, dataloader, num_samples, progress)
        else:
            train_step()
    model.zero_grad(set_to_none=True)

    missing = sorted(set(bases) - set(accumulator.sums))
    if missing:
        raise ValueError(f"No gradient reached target modules {missing[:5]}: are they used by the loss?")

    factors = {}
    for name, (base, layer) in tqdm(targets.items(), desc="LoRA-SB SVD", disable=not progress):
        r = layer.r[adapter_name] if layer is not None else config.r
        u, s, vh = truncated_svd(estimate_update(accumulator.sums.pop(name), lr, update), r)
        factors[name] = (u, torch.diag(s), vh)
        if layer is not None:
            sub = adapter_name in layer.lora_sb_R0 or bool(getattr(config, "subtract_init", False))
            layer.set_factors(adapter_name, u, torch.diag(s), vh, subtract_init=sub)
        else:
            setattr(base, PENDING_FACTORS_ATTR, (u, torch.diag(s), vh))
    return factors
