"""The public task lifecycle: ``start_task(model, name)`` before a task, ``end_task(model, data)`` after.

Training in between is ordinary (``Trainer`` or a plain loop; create the optimizer after ``start_task``, it
opens new parameters). Both functions validate everything and compute every new tensor first, then commit,
so a bad call raises and leaves the model and its config unchanged.

First task (subspace mode): there is no earlier basis. ``get_peft_model`` creates the first slot with a
random orthonormal ``A`` (like FedSVD), which a plain ``start_task(model, name)`` keeps; passing the task's
data, ``start_task(model, name, dataloader)``, replaces it by the top-r principal directions of the task's
inputs (InfLoRA-style, data-aware) -- allowed only while that slot is untrained (``B = 0``).
Later tasks: ``A`` = top-r eigenvectors of ``(I - M M^T) C (I - M M^T)`` with ``C`` the new task's input
covariance when a dataloader is given, else r random orthonormal directions of the complement of ``M``.
Gradient mode uses ``H = G^T G`` (``G = dL/dW`` of the new task's loss at the task's start, see
:func:`~ortho_adapters.continual.subspace.collect_gradients`) in place of ``C``; scaled mode takes
``A = V^T P`` with ``P = I - M diag(lambda) M^T`` and ``V`` the top-r eigenvectors of ``P H P``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from ..core.finite import check_base_weight
from .config import OrthoLoraConfig
from .layer import OrthoLoraLayer, kaiming_rows, task_seed
from .subspace import (
    collect_covariances,
    collect_gradients,
    complement_rows,
    extend_basis,
    scaled_rows,
    update_importance,
)


class TaskLifecycleError(RuntimeError):
    """``start_task`` / ``end_task`` called out of order."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def resolve(model: nn.Module, adapter_name: Optional[str] = None) -> tuple[str, OrthoLoraConfig, dict]:
    """``(adapter name, its config, {module name: OrthoLoraLayer})`` for the active (or given) adapter."""
    model = unwrap(model)
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict):
        raise TypeError(f"expected a PEFT model with an OrthoLoraConfig adapter, got {type(model).__name__}")
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active if isinstance(active, str) else (active[0] if active else None)
    config = peft_config.get(adapter_name)
    if not isinstance(config, OrthoLoraConfig):
        raise ValueError(
            f"adapter {adapter_name!r} is not an OrthoLoraConfig adapter ({type(config).__name__})"
        )
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, OrthoLoraLayer) and adapter_name in module.ortho_lora_B
    }
    if not layers:
        raise ValueError(f"no layer carries the adapter {adapter_name!r}")
    return adapter_name, config, layers


def _task_covariances(
    model: nn.Module, layers: Mapping[str, OrthoLoraLayer], dataloader: Iterable, step: str
):
    """The layers' input covariances over ``dataloader`` after checking their base weights, for ``step``.

    Raises :class:`~ortho_adapters.core.finite.NonFiniteError` (naming ``step`` and the layer) for a NaN / Inf
    base weight or covariance, before anything is computed from them.
    """
    for lname, layer in layers.items():
        check_base_weight(layer, step=step, layer=lname)
    return collect_covariances(unwrap(model), layers, dataloader, step=step)


def _warn_no_new_direction(
    layers: Mapping[str, OrthoLoraLayer],
    adapter_name: str,
    covs: Mapping[str, torch.Tensor],
    bases: Mapping[str, torch.Tensor],
    energy: float,
) -> None:
    """Warn for every layer whose input basis ``M`` gains no direction at ``end_task``."""
    for lname, layer in layers.items():
        old = layer.basis(adapter_name)
        k, n = (0 if old is None else old.shape[1]), layer.in_features
        if bases[lname].shape[1] > k:
            continue
        if k == n:
            why = f"the basis already spans all {n} input dimensions"
        elif not bool(torch.trace(covs[lname]) > 0):
            why = "the task's inputs to this layer are all zero (or the data never reached the layer)"
        else:
            why = f"the task's inputs already lie in the earlier tasks' basis up to energy={energy:g}"
        warnings.warn(
            f"continual.end_task: the input basis of layer '{lname}' gained no direction (k stays {k} of "
            f"{n}): {why}, so this task adds nothing to the protected subspace of that layer",
            UserWarning,
            stacklevel=3,
        )


def _is_trainable(model: nn.Module, adapter_name: str, config: OrthoLoraConfig) -> bool:
    active = getattr(unwrap(model), "active_adapters", [adapter_name])
    return adapter_name in active and not config.inference_mode


def start_task(
    model: nn.Module,
    name: str,
    dataloader: Optional[Iterable] = None,
    adapter_name: Optional[str] = None,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
) -> None:
    """Open task ``name``: freeze the previous task's factors and create the new task's ``A`` and ``B = 0``.

    Args:
        model: a PEFT model (optionally DDP-wrapped) with an :class:`OrthoLoraConfig` adapter.
        name: the task's name (unique in the sequence).
        dataloader: structural modes only, optional: the new task's batches. Subspace mode: ``A`` follows
            their input covariance inside the complement (forward passes only; dict batches as
            ``model(**batch)``). Gradient / scaled modes: ``A`` follows the gradient of their loss (one
            forward and backward pass per batch in eval mode; no parameter's ``.grad`` is touched).
        adapter_name: defaults to the active adapter.
        loss_fn: gradient / scaled modes: ``loss_fn(model, batch)`` -> scalar loss of a batch; default: the
            model output's ``loss`` (labels in the batch).

    Raises:
        TaskLifecycleError: the previous task has not been closed by :func:`end_task`.
        ValueError: a bad or duplicate name, a first task that was already trained while data is passed, or a
            complement smaller than ``r`` (the error names the layer).
        NonFiniteError: (a ``ValueError``) a NaN / Inf in the data's input covariance of a layer or in a
            layer's base weight (subspace mode with data; the error names the layer). Nothing is changed.
    """
    adapter_name, config, layers = resolve(model, adapter_name)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a task name must be a non-empty string, got {name!r}")
    if name in config.task_names:
        raise ValueError(f"task {name!r} already exists in this sequence: {config.task_names}")
    if config.tasks_ended < len(config.task_names):
        open_task = config.task_names[config.tasks_ended]
        raise TaskLifecycleError(
            f"task {open_task!r} is still open: call end_task(model, dataloader) before start_task({name!r})"
        )
    first = not config.task_names
    index = len(config.task_names)
    subspace = config.structural
    if first and subspace and dataloader is not None:
        trained = [n for n, layer in layers.items() if layer.ortho_lora_B[adapter_name].weight.any()]
        if trained:
            raise ValueError(
                f"the first task's B is already non-zero (e.g. '{trained[0]}'): pass the dataloader to "
                "start_task before training, or call start_task without data"
            )
    covs = None
    if subspace and dataloader is not None:
        if config.mode == "subspace":
            covs = _task_covariances(model, layers, dataloader, "continual.start_task")
        else:
            for lname, layer in layers.items():
                check_base_weight(layer, step="continual.start_task", layer=lname)
            covs = collect_gradients(unwrap(model), layers, dataloader, loss_fn, step="continual.start_task")
    new_a: dict[str, torch.Tensor] = {}
    for lname, layer in layers.items():
        r, n = config.rank_for_task(index), layer.in_features
        seed = task_seed(config.init_seed, f"{layer.module_name}.{adapter_name}", index)
        if subspace:
            if first and covs is None:
                continue  # keep the random orthonormal A of the first slot
            cov = None if covs is None else covs[lname]
            if config.mode == "scaled":
                lam = layer.importance(adapter_name)
                new_a[lname] = scaled_rows(layer.basis(adapter_name), lam, n, r, cov, seed, lname).float()
            else:
                new_a[lname] = complement_rows(layer.basis(adapter_name), n, r, cov, seed, lname).float()
        elif not first:
            new_a[lname] = kaiming_rows(r, n, seed)
    # commit
    trainable = _is_trainable(model, adapter_name, config)
    for lname, a in new_a.items():
        if first:
            layers[lname].replace_current_a(adapter_name, a)
        else:
            layers[lname].push_task(adapter_name, a, trainable)
    config.task_names.append(name)


def end_task(
    model: nn.Module, dataloader: Optional[Iterable] = None, adapter_name: Optional[str] = None
) -> dict[str, int]:
    """Close the open task: freeze its factors and (subspace mode) extend every layer's input basis ``M``.

    Subspace mode needs ``dataloader`` (the finished task's batches, forward passes only under ``no_grad``;
    dict batches as ``model(**batch)``, anything else as ``model(batch)``): each layer's ``C = sum x^T x`` is
    summed over all ranks of an initialized ``torch.distributed`` group, so every rank gets the same basis.
    The basis keeps ``config.energy_for_task(t)`` of ``C``'s spectrum (GPM's criterion). O-LoRA mode ignores
    the data.

    Returns:
        ``{layer name: basis dimension k}`` after the update (empty in olora mode).

    Raises:
        TaskLifecycleError: no task is open (``start_task`` was not called, or the task was already ended).
        ValueError: subspace mode without a dataloader, or a dataloader without batches.
        NonFiniteError: (a ``ValueError``) a NaN / Inf in a layer's input covariance or base weight; the task
            stays open and nothing is changed.

    Warns:
        UserWarning: for each layer whose basis gains no direction (all-zero inputs, inputs already inside the
            basis, or a basis that spans every input dimension).
    """
    adapter_name, config, layers = resolve(model, adapter_name)
    if config.tasks_ended >= len(config.task_names):
        raise TaskLifecycleError(
            "no task is open: call start_task(model, name) before training a task and end_task after it"
        )
    bases: dict[str, torch.Tensor] = {}
    lams: dict[str, torch.Tensor] = {}
    if config.structural:
        if dataloader is None:
            raise ValueError(f"end_task in {config.mode} mode needs the finished task's dataloader")
        covs = _task_covariances(model, layers, dataloader, "continual.end_task")
        energy = config.energy_for_task(config.tasks_ended)
        for lname, layer in layers.items():
            bases[lname] = extend_basis(layer.basis(adapter_name), covs[lname], energy, config.room_share)
            if config.mode == "scaled":
                old = layer.importance(adapter_name)
                lams[lname] = update_importance(bases[lname], old, covs[lname], config.sgp_scale)
        _warn_no_new_direction(layers, adapter_name, covs, bases, energy)
    # commit
    for lname, layer in layers.items():
        if lname in bases:
            layer.set_basis(adapter_name, bases[lname], lams.get(lname))
        layer.freeze_current(adapter_name)
    config.tasks_ended += 1
    return {lname: int(m.shape[1]) for lname, m in bases.items()}
