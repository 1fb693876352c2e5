"""LoRA-SB gradient initialization (arXiv 2411.19557, Sec. 3).

Accumulate the gradient ``G`` of the loss w.r.t. each TARGET weight only (fp32, from hooks:
``G = sum_tokens dy^T x``), form the estimated first update ``dW = -eta * sign(G)`` (Adam's first step;
``update="grad"`` uses ``-eta * G / ||G||_F``), take its truncated SVD ``U_r S_r V_r^T`` and set
``B = U_r``, ``A = V_r^T``, ``R = diag(S_r)``, so that ``s B R A`` is the best rank-r approximation of
``dW`` and ``B``, ``A`` are orthonormal.

During the gradient pass no parameter of the model requires grad (every flag is saved and restored, also
on an exception): the gradient path comes from hooks (the input embeddings' output, or a target's output
when nothing upstream requires grad), so autograd forms no parameter gradient at all and no ``.grad`` is
read, written or cleared. The only memory the pass adds to a forward + backward without parameter
gradients is the fp32 sums ``G`` of the target layers.

``eta`` (``step_size``) is the learning rate of the FIRST optimizer step, not the training learning rate:
with a linear warm-up it is ``learning_rate / warmup_steps`` (the official code's choice). Passing the
training learning rate instead moves the model a full-size sign step in every direction of every target at
once and can wreck it; :func:`initialize_lora_sb` derives ``eta`` from ``learning_rate`` + ``warmup_steps``
or from ``TrainingArguments`` and warns when installing the factors raises the loss sharply.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Literal, Optional

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from tqdm.auto import tqdm

from ..core.batches import call_model, to_device
from ..core.distributed import all_reduce_sums, broadcast_from_first
from ..core.finite import NonFiniteError, check_finite
from ..core.layer import is_supported_base
from ..core.svd import SVD_METHODS, SVDMethod, truncated_svds
from ..core.zero3 import whole_for_plain_forward
from .config import LoraSBConfig
from .layer import PENDING_FACTORS_ATTR, LoraSBLayer

# Loss check: warn when installing the factors raises the mean loss on the init batches by more than
# min(10 % of the loss before, ln 2), at least LOSS_RISE_FLOOR. A first step of the right size is a
# descent step: to first order it LOWERS the loss, and it did in every measurement (SmolLM2-135M, answer
# tokens of 32 Rotten Tomatoes prompts, eta = 5e-3 / 10: 3.879 -> 0.487; MiniLM main job, eta = 5e-3 / 15:
# 0.6884 -> 0.6878), while a training learning rate used as eta raised it by 90-260 % (SmolLM2, 5e-3:
# 3.879 -> 8.879; MiniLM 1.25e-3 / 5e-3: -> 1.306 / 2.447). 10 % sits far from both and above the
# residual noise (the check replays the pass's dropout masks); ln 2 nats (a doubled perplexity) caps the
# tolerance for large losses; the floor keeps near-zero losses from warning on rounding.
LOSS_RISE_RELATIVE = 0.10
LOSS_RISE_ABSOLUTE = math.log(2.0)
LOSS_RISE_FLOOR = 0.01

# Schedulers of transformers' ``get_scheduler`` that ignore ``warmup_steps``: their first step uses the
# full learning rate.
_SCHEDULERS_WITHOUT_WARMUP = ("constant", "reduce_lr_on_plateau", "greedy")

_ETA_HELP = (
    "eta is the learning rate of the FIRST optimizer step (the official code's choice), not the training "
    "learning rate: pass step_size=eta, or learning_rate= together with warmup_steps= "
    "(eta = learning_rate / max(warmup_steps, 1)), or training_args=TrainingArguments(...)"
)


class LoraSBInitResult(dict):
    """``{module name: (B, R, A)}`` (fp32) as returned by :func:`initialize_lora_sb`, plus what the init used.

    Attributes:
        step_size: the ``eta`` used (``dW = -eta * sign(G)``).
        samples: number of examples the gradient pass saw (whole batches; ``None`` with ``train_step``).
        loss_before: mean loss over the init batches without the new factors (from the gradient pass,
            weighted by batch size); ``None`` with ``train_step`` unless it returned the loss.
        loss_after: the same mean with the factors applied (``W0 + B R A``), measured by one extra
            no-grad forward over the same batches (same dropout masks); equal to ``loss_before`` without
            a forward when the start is exactly the base (``subtract_init``); ``None`` when not measured
            (``loss_check=False`` or ``train_step``).
    """

    step_size: float
    samples: Optional[int] = None
    loss_before: Optional[float] = None
    loss_after: Optional[float] = None

    @property
    def loss_rise(self) -> Optional[float]:
        """``loss_after - loss_before`` (``None`` when either was not measured)."""
        if self.loss_before is None or self.loss_after is None:
            return None
        return self.loss_after - self.loss_before


# ------------------------------------------------------------------------------------------ step size


def _positive_number(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return value


def _warmup_count(warmup: Any, num_training_steps: Optional[int], source: str) -> int:
    """Warm-up steps as transformers counts them: an int, or a float in (0, 1) = ratio of the total steps."""
    warmup = _positive_number(f"{source}warmup_steps", warmup, allow_zero=True)
    if warmup >= 1 or warmup == 0:
        return int(warmup)
    if num_training_steps is None:
        raise ValueError(
            f"{source}warmup_steps={warmup} is a ratio of the total step count: pass num_training_steps= "
            "(the optimizer steps of the whole run) so that eta = learning_rate / ceil(ratio * total) can "
            "be computed, or give the warm-up as a number of steps"
        )
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, numbers.Integral):
        raise ValueError(f"num_training_steps must be an int, got {num_training_steps!r}")
    if num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be positive, got {num_training_steps}")
    return math.ceil(num_training_steps * warmup)


def resolve_step_size(
    step_size: Optional[float] = None,
    learning_rate: Optional[float] = None,
    warmup_steps: Optional[float] = None,
    training_args: Any = None,
    num_training_steps: Optional[int] = None,
) -> float:
    """``eta`` of LoRA-SB's init from exactly one source (see :func:`initialize_lora_sb`)."""
    given = [
        name
        for name, value in (
            ("step_size", step_size),
            ("learning_rate", learning_rate),
            ("training_args", training_args),
        )
        if value is not None
    ]
    if not given:
        raise ValueError(f"initialize_lora_sb needs the init's step size eta. {_ETA_HELP}.")
    if len(given) > 1:
        raise ValueError(
            f"initialize_lora_sb got several sources for eta ({', '.join(given)}): give exactly one. "
            f"{_ETA_HELP}."
        )
    if warmup_steps is not None and learning_rate is None:
        raise ValueError(
            "warmup_steps= only goes with learning_rate= (eta = learning_rate / max(warmup_steps, 1)); "
            f"with {given[0]}= it would be ignored"
        )
    if step_size is not None:
        return _positive_number("step_size", step_size)
    if learning_rate is not None:
        lr = _positive_number("learning_rate", learning_rate)
        if warmup_steps is None:
            raise ValueError(
                "learning_rate= needs warmup_steps= as well (the warm-up steps of your schedule, 0 if it has "
                "none, or a ratio < 1 with num_training_steps=): eta = learning_rate / max(warmup_steps, 1) "
                "is the first optimizer step's learning rate"
            )
        return lr / max(_warmup_count(warmup_steps, num_training_steps, ""), 1)
    for attribute in ("learning_rate", "warmup_steps"):
        if not hasattr(training_args, attribute):
            raise ValueError(
                f"training_args must be a transformers TrainingArguments (with learning_rate and "
                f"warmup_steps), got {type(training_args).__name__} without {attribute!r}"
            )
    lr = _positive_number("training_args.learning_rate", training_args.learning_rate)
    scheduler = getattr(training_args, "lr_scheduler_type", "linear")
    if str(getattr(scheduler, "value", scheduler)) in _SCHEDULERS_WITHOUT_WARMUP:
        return lr  # transformers' get_scheduler ignores warmup_steps for these
    if num_training_steps is None and (getattr(training_args, "max_steps", -1) or -1) > 0:
        num_training_steps = int(training_args.max_steps)
    from ..core.compat import warmup_of  # transformers 4.x keeps a ratio in warmup_ratio

    warmup = warmup_of(training_args, num_training_steps)
    return lr / max(_warmup_count(warmup, num_training_steps, "training_args."), 1)


def estimate_update(grad: torch.Tensor, step_size: float, update: str) -> torch.Tensor:
    """First-step update estimate: ``-eta * sign(G)`` ("sign", Adam's first step) or ``-eta * G/||G||_F``."""
    if update == "sign":
        return -step_size * torch.sign(grad)
    if update == "grad":
        return -step_size * grad / grad.norm().clamp_min(torch.finfo(grad.dtype).tiny)
    raise ValueError(f"update must be 'sign' or 'grad', got {update!r}")


# ------------------------------------------------------------------------------------- gradient pass


@contextmanager
def _parameters_frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside; every flag is restored exactly on exit (also on an exception)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _first_input(inputs: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    x = inputs[0] if inputs else next(iter(kwargs.values()), None)
    return x if isinstance(x, torch.Tensor) else None


class _GradientAccumulator:
    """Sums ``dy^T x`` (fp32, ``out x in``) for each watched module through forward + tensor hooks.

    A target whose output does not require grad (nothing upstream does) gets it through ``output + 0``
    with a fresh scalar leaf, so backward reaches it without any parameter requiring grad; the result is
    a non-leaf tensor, so the model may still modify it in place.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, inputs: tuple, kwargs: dict, output: Any) -> Any:
            x = _first_input(inputs, kwargs)
            if not torch.is_grad_enabled() or x is None or not isinstance(output, torch.Tensor):
                return None
            replaced = None
            if not output.requires_grad:
                anchor = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                output = replaced = output + anchor
            x = x.detach()

            def grad_hook(grad: torch.Tensor) -> None:
                g = grad.reshape(-1, grad.shape[-1]).float()
                xs = x.reshape(-1, x.shape[-1]).float()
                total = self.sums.get(name)
                if total is None:
                    self.sums[name] = g.t() @ xs
                else:
                    total.addmm_(g.t(), xs)

            output.register_hook(grad_hook)
            return replaced

        return forward_hook

    def attach(self, stack: ExitStack) -> _GradientAccumulator:
        for name, module in self.modules.items():
            handle = module.register_forward_hook(self._hook(name), with_kwargs=True)
            stack.callback(handle.remove)
        return self


def _embeddings_require_grad(model: nn.Module, stack: ExitStack) -> None:
    """Make the input embeddings' output require grad (as transformers' ``enable_input_require_grads``).

    Not needed for correctness (the targets' hooks start the path themselves), but it keeps reentrant
    gradient checkpointing working, which needs its blocks' inputs to require grad.
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if not callable(get_embeddings):
        return
    try:
        embeddings = get_embeddings()
    except (NotImplementedError, AttributeError):
        return
    if not isinstance(embeddings, nn.Module):
        return

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point():
            output.requires_grad_(True)

    stack.callback(embeddings.register_forward_hook(hook).remove)


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
    if isinstance(batch, Mapping):
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() > 0 else 1


def _batch_loss(model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
    out = call_model(model, to_device(batch, device))
    loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise ValueError("initialize_lora_sb's batches must make the model return a `loss` (pass labels)")
    return loss


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = (device.index if device.index is not None else torch.cuda.current_device(),)
        state["cuda"] += (torch.cuda.get_rng_state(state["cuda"][0]),)
    return state


@contextmanager
def _replayed_rng(state: dict[str, Any]) -> Iterator[None]:
    """Run with the RNG state captured before the gradient pass (same dropout masks), then restore it."""
    cuda = state.get("cuda")
    with torch.random.fork_rng(devices=[cuda[0]] if cuda else []):
        torch.set_rng_state(state["cpu"])
        if cuda:
            torch.cuda.set_rng_state(cuda[1], cuda[0])
        yield


class _Pass:
    """What the gradient pass saw: samples, the sample-weighted mean loss, the batches and the RNG state.

    ``bad_loss``: ``(batch index, loss)`` of the first batch whose loss was NaN / Inf (the pass stops there).
    """

    def __init__(self) -> None:
        self.samples = 0
        self.loss_sum = 0.0
        self.batches: list[Any] = []
        self.rng: Optional[dict[str, Any]] = None
        self.bad_loss: Optional[tuple[int, torch.Tensor]] = None

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.samples


def _gradient_pass(
    model: nn.Module, dataloader: Iterable, num_samples: Optional[int], keep: bool, progress: bool
) -> _Pass:
    device = next(model.parameters()).device
    seen = _Pass()
    with tqdm(total=num_samples, desc="LoRA-SB gradient init", unit="sample", disable=not progress) as bar:
        for index, batch in enumerate(dataloader):
            if seen.rng is None:
                seen.rng = _rng_state(device)
            loss = _batch_loss(model, batch, device)
            if not loss.requires_grad:
                raise ValueError(
                    "the loss does not depend on any LoRA-SB target module (no gradient path): are the "
                    "targets used in the forward pass, and is autograd enabled?"
                )
            loss.backward()
            value = float(loss.detach().float())
            if not math.isfinite(value):  # its gradient is in G: the checks after the pass name the layers
                seen.bad_loss = (index, loss.detach())
                break
            n = _batch_size(batch)
            seen.samples += n
            seen.loss_sum += value * n
            if keep:
                seen.batches.append(batch)
            del loss
            bar.update(n)
            if num_samples is not None and seen.samples >= num_samples:
                break
    if seen.samples == 0 and seen.bad_loss is None:
        raise ValueError("initialize_lora_sb got an empty dataloader")
    return seen


_STEP = "initialize_lora_sb"
_BAD_LOSS = "\0non-finite loss"  # all-reduced with the sums: every process learns that one saw a bad loss
_DATA_HINT = (
    "check the init batches (a NaN / Inf in the inputs, or a batch whose labels are all -100 gives a NaN "
    "loss); no factor was installed and the model was left unchanged"
)


def _check_pass(
    sums: dict[str, torch.Tensor], names: Iterable[str], bad_loss: Optional[tuple[int, Any]]
) -> None:
    """Raise :class:`NonFiniteError` for a non-finite gradient sum (naming the layer) or init loss.

    Every process calls it with the all-reduced ``sums`` (including the ``_BAD_LOSS`` flag), so all raise.
    """
    flags = sums.pop(_BAD_LOSS)
    hint = _DATA_HINT
    if bad_loss is not None:
        hint = f"the loss of init batch {bad_loss[0]} was {float(bad_loss[1]):g}; {_DATA_HINT}"
    for name in names:
        check_finite(sums[name], step=_STEP, statistic="gradient sum G = sum dy^T x", layer=name, hint=hint)
    if bad_loss is not None:
        check_finite(bad_loss[1], step=_STEP, statistic=f"loss of init batch {bad_loss[0]}", hint=_DATA_HINT)
    if bool(flags.any()):  # another process saw it
        nan, inf = int(flags[0]), int(flags[1])
        raise NonFiniteError(
            _STEP, "loss of an init batch on another process", None, nan, inf, nan + inf, _DATA_HINT
        )


def _loss_flags(bad_loss: Optional[tuple[int, Any]], device: torch.device) -> torch.Tensor:
    """``[is NaN, is Inf]`` of the bad loss (zeros without one), to be all-reduced with the gradient sums."""
    if bad_loss is None:
        return torch.zeros(2, device=device)
    value = float(bad_loss[1])
    return torch.tensor([float(math.isnan(value)), float(math.isinf(value))], device=device)


def _loss_with_factors(
    model: nn.Module,
    bases: dict[str, nn.Module],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    seen: _Pass,
    adapters_off: Any,
    progress: bool,
) -> float:
    """Mean loss over ``seen.batches`` of ``W0 + B R A`` (through output hooks; no weight is touched)."""
    device = next(model.parameters()).device

    def delta_hook(b: torch.Tensor, rmat: torch.Tensor, a: torch.Tensor):
        def hook(module: nn.Module, inputs: tuple, kwargs: dict, output: Any) -> Any:
            x = _first_input(inputs, kwargs)
            if x is None or not isinstance(output, torch.Tensor):
                return None
            delta = (x.to(a.dtype) @ a.t()) @ rmat.t() @ b.t()
            return output + delta.to(output.dtype)

        return hook

    total = 0.0
    with ExitStack() as stack:
        stack.enter_context(adapters_off)
        stack.enter_context(torch.no_grad())
        for name, module in bases.items():
            handle = module.register_forward_hook(delta_hook(*factors[name]), with_kwargs=True)
            stack.callback(handle.remove)
        stack.enter_context(_replayed_rng(seen.rng))
        for batch in tqdm(seen.batches, desc="LoRA-SB loss check", disable=not progress):
            total += float(_batch_loss(model, batch, device).float()) * _batch_size(batch)
    return total / seen.samples


def _loss_threshold(before: float) -> float:
    return max(min(LOSS_RISE_RELATIVE * abs(before), LOSS_RISE_ABSOLUTE), LOSS_RISE_FLOOR)


# ------------------------------------------------------------------------------------------ public API


def initialize_lora_sb(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    train_step: Optional[Callable[[], Any]] = None,
    *,
    config: Optional[LoraSBConfig] = None,
    num_samples: Optional[int] = 64,
    step_size: Optional[float] = None,
    learning_rate: Optional[float] = None,
    warmup_steps: Optional[float] = None,
    training_args: Any = None,
    num_training_steps: Optional[int] = None,
    update: Literal["sign", "grad"] = "sign",
    svd: SVDMethod = "auto",
    adapter_name: str = "default",
    progress: bool = True,
    loss_check: bool = True,
    **removed: Any,
) -> LoraSBInitResult:
    """Compute LoRA-SB's gradient-derived ``(B, R, A)`` for every target layer and install them.

    Args:
        model: a PEFT model with LoRA-SB layers (the factors of ``adapter_name`` are replaced in place), or a
            plain model together with ``config`` (the factors are kept on the target modules and used by the
            next ``get_peft_model(model, config)`` with ``init="gradient"``).
        dataloader: batches (dicts passed as ``model(**batch)``, or tensors passed as ``model(batch)``, whose
            output has ``loss``); iterated until ``num_samples`` examples (``None``: all), whole batches.
        train_step: alternatively a callable that runs forward and ``backward()`` itself, called once (it
            may return the loss; the loss check needs a dataloader and is skipped).
        config: the ``LoraSBConfig`` (required for a plain model).
        num_samples: examples of the gradient pass (the official code uses ~0.1 % of the train set).

        The step size ``eta`` of ``dW = -eta * sign(G)`` is the learning rate of the FIRST optimizer step,
        not the training learning rate. Give exactly one of:

        step_size: ``eta`` itself.
        learning_rate: the training (peak) learning rate, with ``warmup_steps`` (required; ``0`` for no
            warm-up; a float in (0, 1) is a ratio of ``num_training_steps``):
            ``eta = learning_rate / max(warmup_steps, 1)``, as in the official code.
        training_args: a transformers ``TrainingArguments``: its ``learning_rate`` and ``warmup_steps``
            (an int, or a ratio < 1 of ``num_training_steps``, else of ``max_steps`` when set), the same
            formula; schedulers without warm-up (``constant``, ...) give ``eta = learning_rate``.
        num_training_steps: total optimizer steps of the run, only needed for a warm-up ratio.

        update: ``"sign"`` (Adam's first step, the paper's choice) or ``"grad"`` (``-eta G / ||G||_F``).
        svd: how the rank-r truncation of ``dW`` is computed: ``"full"`` (LAPACK, exact), ``"randomized"``
            (Halko et al. 2011 with oversampling and power iterations: milliseconds instead of seconds per
            large matrix, within 1 % of the exact truncation's error on real update estimates, see
            ``scripts/bench_init.py``) or ``"auto"`` (randomized where the sketch is small against the
            matrix, see :func:`ortho_adapters.core.svd.resolve_svd_method`). Layers of one shape are batched.
        adapter_name: the adapter whose factors are replaced (PEFT model).
        progress: show tqdm bars.
        loss_check: after the factors are computed, run one extra no-grad forward over the same batches
            (model in its current mode, same dropout masks, adapters off, ``W0 + B R A`` applied through
            output hooks, so the model is left exactly as it was) and ``warnings.warn`` when the mean loss
            rose by more than ``min(10 %, ln 2)`` (at least 0.01): the usual sign of an ``eta`` that is a
            training learning rate. Skipped with ``train_step`` and when the start is exactly the base
            (``subtract_init``).

    During the pass no parameter requires grad (flags restored exactly afterwards, also on an error); only
    the fp32 sums ``G = sum dy^T x`` of the targets are accumulated, from hooks. Nothing is written to or
    cleared from any parameter's ``.grad`` (gradients the user already holds stay as they were). The SVD runs
    in fp32 without touching the global RNG (the loss check replays the pass's RNG state in a fork).

    Returns:
        a :class:`LoraSBInitResult`: the dict ``{module name: (B, R, A)}`` with attributes ``step_size``,
        ``samples``, ``loss_before``, ``loss_after`` and ``loss_rise``.

    Raises:
        ValueError: no / several sources for ``eta``, bad data or targets. ``TypeError`` for ``lr=`` (removed:
        it read like the training learning rate) and for unknown keywords.
        NonFiniteError: (a ``ValueError``) a NaN / Inf in a target's gradient sum ``G`` (the message names
        the layer and the batch whose loss was non-finite) or in an init batch's loss (e.g. a batch whose
        labels are all -100). Raised before any SVD: no factor is installed, the model is unchanged.

    Warns:
        UserWarning: targets whose ``G`` is exactly zero (their ``B``, ``A`` are then arbitrary).
    """
    if "lr" in removed:
        raise TypeError(
            f"initialize_lora_sb no longer takes lr= (got lr={removed['lr']!r}): it read like the training "
            f"learning rate, but it is the init's step size eta. {_ETA_HELP}."
        )
    if removed:
        raise TypeError(f"initialize_lora_sb got unexpected keyword arguments {sorted(removed)}")
    if (dataloader is None) == (train_step is None):
        raise ValueError("initialize_lora_sb needs exactly one of `dataloader` or `train_step`")
    if update not in ("sign", "grad"):
        raise ValueError(f"update must be 'sign' or 'grad', got {update!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    eta = resolve_step_size(step_size, learning_rate, warmup_steps, training_args, num_training_steps)
    targets = _find_targets(model, config, adapter_name)
    if not targets:
        raise ValueError(f"No LoRA-SB layer carries adapter '{adapter_name}'")
    bases = {name: base for name, (base, _) in targets.items()}
    peft_layers = [layer for _, layer in targets.values() if layer is not None]

    def adapters_off() -> Any:
        return model.disable_adapter() if peft_layers and hasattr(model, "disable_adapter") else nullcontext()

    result = LoraSBInitResult()
    result.step_size = eta
    # outermost, so that PEFT's disable_adapter (which re-enables the active adapter's grads on exit)
    # cannot leave a flag changed
    # weights partitioned at load (ZeRO-3 zero.Init) before deepspeed.initialize: gathered for the passes
    with _parameters_frozen(model), whole_for_plain_forward(model):
        seen = None
        with ExitStack() as stack:
            stack.enter_context(adapters_off())
            _embeddings_require_grad(model, stack)
            accumulator = _GradientAccumulator(bases).attach(stack)
            if dataloader is not None:
                seen = _gradient_pass(model, dataloader, num_samples, loss_check, progress)
                if seen.bad_loss is None:  # else _check_pass raises below
                    result.samples, result.loss_before = seen.samples, seen.mean_loss
            else:
                returned = train_step()
                if isinstance(returned, torch.Tensor) and returned.numel() == 1:
                    result.loss_before = float(returned.detach().float())
                elif isinstance(returned, numbers.Real):
                    result.loss_before = float(returned)
        bad_loss = seen.bad_loss if seen is not None else None
        if seen is None and result.loss_before is not None and not math.isfinite(result.loss_before):
            bad_loss = (0, torch.tensor(result.loss_before))

        missing = sorted(set(bases) - set(accumulator.sums))
        if missing:
            raise ValueError(f"No gradient reached target modules {missing[:5]}: are they used by the loss?")
        # every process's G added up (DDP, FSDP, DeepSpeed): each process then installs the factors of one
        # process that saw all the init batches; every process must call initialize_lora_sb
        sums = accumulator.sums
        sums[_BAD_LOSS] = _loss_flags(bad_loss, next(iter(sums.values())).device)
        all_reduce_sums(sums)
        _check_pass(sums, bases, bad_loss)  # before any SVD: nothing is computed from a bad G

        zero = []
        ranks = {
            name: layer.r[adapter_name] if layer is not None else config.r
            for name, (_, layer) in targets.items()
        }
        for name in targets:  # each G is replaced by its update estimate: no extra copy of a layer is held
            sums[name] = estimate_update(sums[name], eta, update)
        svds = truncated_svds(sums, ranks, method=svd, step=_STEP, statistic="update estimate dW")
        with tqdm(total=len(targets), desc="LoRA-SB SVD", unit="layer", disable=not progress) as bar:
            for names, (us, ss, vhs) in svds:
                for name, u, s, vh in zip(names, us, ss, vhs):
                    if not bool(s[0] > 0):
                        zero.append(name)
                    result[name] = (u, torch.diag(s), vh)
                bar.update(len(names))
        if zero:
            warnings.warn(
                f"initialize_lora_sb: the gradient sum G of {len(zero)} layer(s) is exactly zero (e.g. "
                f"'{zero[0]}'): no gradient reached them through the init batches, so their update estimate "
                "is 0, B and A are arbitrary orthonormal factors and R starts at 0. Use more or other init "
                "batches.",
                UserWarning,
                stacklevel=2,
            )

        subtract = bool(getattr(config, "subtract_init", False))
        starts_at_base = all(
            subtract or (layer is not None and adapter_name in layer.lora_sb_R0)
            for _, layer in targets.values()
        )
        if loss_check and seen is not None:
            if starts_at_base:
                result.loss_after = result.loss_before
            else:
                result.loss_after = _loss_with_factors(model, bases, result, seen, adapters_off(), progress)
            seen.batches.clear()
            _warn_on_loss_rise(result)

    broadcast_from_first([t for name in sorted(result) for t in result[name]])  # identical on all ranks
    for name, (base, layer) in targets.items():
        b, rmat, a = result[name]
        if layer is not None:
            sub = adapter_name in layer.lora_sb_R0 or subtract
            layer.set_factors(adapter_name, b, rmat, a, subtract_init=sub)
        else:
            setattr(base, PENDING_FACTORS_ATTR, (b, rmat, a))
    return result


def _warn_on_loss_rise(result: LoraSBInitResult) -> None:
    before, after = result.loss_before, result.loss_after
    threshold = _loss_threshold(before)
    if math.isfinite(after) and after - before <= threshold:
        return
    relative = f", {(after - before) / abs(before):+.1%}" if before else ""
    warnings.warn(
        f"LoRA-SB init: applying the factors raised the mean loss on the {result.samples} init samples from "
        f"{before:.4f} to {after:.4f} ({after - before:+.4f}{relative}; warning "
        f"above +{threshold:.4f}) with step size eta={result.step_size:.3g}. The model starts at W0 + B R A, "
        f"one step of size eta away from the base; {_ETA_HELP} (e.g. 5e-3 with 100 warm-up steps: 5e-5). "
        "Lower eta, or use LoraSBConfig(subtract_init=True) to start exactly at the base model.",
        UserWarning,
        stacklevel=3,
    )
