"""The tuner-layer base every ortho_adapters method builds on.

It wraps ``nn.Linear``, transformers' ``Conv1D`` and bitsandbytes 8/4-bit linear layers, keeps
several named adapters and implements merge / unmerge / safe_merge / disable on top of two method hooks:

* :meth:`OrthoLayer.adapter_output` -- the adapter's contribution for an input ``x``, and
* :meth:`OrthoLayer.merged_weight` / :meth:`OrthoLayer.unmerged_weight` -- ``W -> W'`` and back
  (default: add / subtract :meth:`OrthoLayer.delta_weight`).

Precision follows PEFT: adapters are created in fp32 (data-derived factors are computed in fp32 and kept
so), and ``autocast_adapter_dtype=False`` casts them to the base layer's dtype. Without autocast the input
is cast to the adapter's dtype; under ``torch.autocast`` it is passed as is and every adapter matmul runs
in the autocast dtype, forward and backward (no fp32 copy of the activations is made).

Trainable tensors live in small leaf modules (one per adapter, in an ``nn.ModuleDict`` named in
``adapter_layer_names``) that are actually called in forward, frozen factors in persistent
``BufferDict`` s named in ``other_param_names``: FSDP needs uniform ``requires_grad`` per flattened
module, and PEFT saves every listed buffer with the adapter.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..kernels.dispatch import fused_forward
from .base_weight import read_weight, write_weight
from .compat import in_out_features, quantization_backend
from .config import OrthoAdapterConfig
from .cpu_4bit import remember_4bit_state, restore_4bit_layout


def is_supported_base(module: nn.Module) -> bool:
    """``nn.Linear``, ``Conv1D`` or a quantized linear layer PEFT knows how to dequantize."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    backend = quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"


# Per-adapter state every layer keeps; subclasses append their own names to ``other_param_names``.
COMMON_NAMES: tuple[str, ...] = ("r", "scaling", "adapter_dropout", "use_kernels")


class OrthoLayer(nn.Module, BaseTunerLayer):
    """Base class of every ortho_adapters tuner layer (see module docstring)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = COMMON_NAMES

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: OrthoAdapterConfig, **kwargs: Any):
        super().__init__()
        self.base_layer = base_layer
        base = self.get_base_layer()
        if not is_supported_base(base):
            raise TypeError(
                f"{type(self).__name__} cannot wrap {type(base).__name__}: only torch.nn.Linear, "
                "transformers' Conv1D and bitsandbytes 8/4-bit linear layers are supported"
            )
        self.quantization_backend = quantization_backend(base)
        if self.quantization_backend is not None:
            remember_4bit_state(base)
        self.in_features, self.out_features = in_out_features(base)
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.module_name: str = kwargs.get("module_name", "")
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.use_kernels: dict[str, bool] = {}  # per adapter: config.use_kernels (fused Triton path)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.kwargs = kwargs
        self.adapter_dropout = nn.ModuleDict()
        self._create_containers()
        self.update_layer(adapter_name, config)

    # ----- what a method implements -------------------------------------------------------------
    def _create_containers(self) -> None:
        """Create the (empty) ModuleDicts / BufferDicts named in the two name tuples."""
        raise NotImplementedError

    def create_adapter(self, adapter_name: str, config: OrthoAdapterConfig) -> None:
        """Fill the containers for ``adapter_name`` (called once per adapter)."""
        raise NotImplementedError

    @classmethod
    def rank_limit(cls, out_features: int, in_features: int) -> int:
        """Largest rank a layer of this shape supports (default ``min(out, in)``)."""
        return min(out_features, in_features)

    @classmethod
    def resolve_rank(cls, config: OrthoAdapterConfig, out_features: int, in_features: int) -> int:
        """The rank of this layer: ``config.r``, or :meth:`rank_limit` when ``r`` is None (full rank)."""
        return cls.rank_limit(out_features, in_features) if config.r is None else config.r

    @classmethod
    def check_rank(cls, r: int, out_features: int, in_features: int, module_name: str) -> None:
        """Raise ``ValueError`` naming the layer when ``r`` exceeds :meth:`rank_limit`."""
        limit = cls.rank_limit(out_features, in_features)
        if r > limit:
            raise ValueError(
                f"r={r} is too large for layer '{module_name}' (out={out_features}, in={in_features}): "
                f"{cls.__name__} allows r <= {limit}"
            )

    @classmethod
    def base_weight_step(cls, config: OrthoAdapterConfig) -> Optional[str]:
        """The name of the init step that reads the base weight under ``config`` (an SVD, an LU), or ``None``.

        When set, every target's base weight is checked for NaN / Inf before any module is replaced
        (:meth:`~ortho_adapters.core.model.OrthoTuner.inject_adapter`), so a bad base leaves the model as it
        was.
        """
        return None

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution for ``x`` (adapter's dtype; any dtype under autocast)."""
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """fp32 ``(out, in)`` matrix ``W' - W`` of an additive adapter."""
        raise NotImplementedError

    def frozen_factors(
        self, adapter_name: str
    ) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, float]]:
        """``(A, M, B, s)`` with ``adapter_output(x) == s ((x A^T) M^T) B^T`` and ``A`` frozen, or ``None``.

        ``M``: r x r, an r vector (diagonal) or ``None`` (identity). Methods of that form return it so that
        :mod:`ortho_adapters.kernels` can fuse the layer on CUDA; ``None`` (default) keeps the PyTorch path.
        """
        return None

    def sample_weights(self, adapter_name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample factors (broadcasting over ``x``) that scale the adapter's contribution, or ``None``.

        ``None`` (default) applies the adapter to every sample in full. O3's gate returns one weight per
        sample; a method that returns weights must not expose :meth:`frozen_factors` (the fused path has
        no per-sample scale).
        """
        return None

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Return ``W'`` for fp32 base weight ``W`` (default ``W + delta``); must not modify ``weight``."""
        return weight + self.delta_weight(adapter_name)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`."""
        return weight - self.delta_weight(adapter_name)

    # ----- shared machinery ------------------------------------------------------------------------
    @property
    def trainable_modules(self) -> nn.ModuleDict:
        """The ModuleDict that holds one trainable leaf module per adapter."""
        return getattr(self, self.adapter_layer_names[0])

    def update_layer(self, adapter_name: str, config: OrthoAdapterConfig, **kwargs: Any) -> None:
        """Add adapter ``adapter_name`` to this layer, validating the rank against the layer's shape."""
        r = self.resolve_rank(config, self.out_features, self.in_features)
        self.check_rank(r, self.out_features, self.in_features, self.module_name)
        self.r[adapter_name] = r
        self.use_kernels[adapter_name] = getattr(config, "use_kernels", True)
        self.adapter_dropout[adapter_name] = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        with torch.no_grad():
            self.create_adapter(adapter_name, config)
        self._move_adapter_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _adapter_containers(self, adapter_name: str):
        """``(container, adapter_name)`` for every ModuleDict / BufferDict that holds this adapter."""
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if isinstance(container, (nn.ModuleDict, BufferDict)) and adapter_name in container:
                yield container

    def _move_adapter_to_base_device(self, adapter_name: str) -> None:
        """Move the adapter to the base layer's device, keeping its dtype (fp32 unless cast later).

        Tensors on the meta device (``low_cpu_mem_usage=True``) stay there until the state dict fills them.
        """
        device = self.get_base_layer().weight.device
        if device.type == "meta":
            return
        for container in self._adapter_containers(adapter_name):
            item = container[adapter_name]
            tensors = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
            if any(t.device.type == "meta" for t in tensors):
                continue
            container[adapter_name] = item.to(device)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the base layer computes in (fp32 for quantized layers without a float compute dtype)."""
        base = self.get_base_layer()
        if self.quantization_backend is not None:
            return getattr(base, "compute_dtype", None) or torch.float32
        return base.weight.dtype

    def cast_adapter(self, adapter_name: str, dtype: torch.dtype) -> None:
        """Cast the adapter's float parameters and buffers to ``dtype`` (``autocast_adapter_dtype=False``)."""
        for container in self._adapter_containers(adapter_name):
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):
                if item.is_floating_point():
                    container[adapter_name] = item.to(dtype)
            else:
                container[adapter_name] = item.to(dtype)  # Module.to only casts floating tensors

    def adapter_dtype(self, adapter_name: str) -> torch.dtype:
        """The dtype of the adapter's trainable tensors (fp32 unless ``autocast_adapter_dtype=False``)."""
        for param in self.trainable_modules[adapter_name].parameters():
            return param.dtype
        return torch.float32

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the active (or given) adapters into the base weight.

        With ``safe_merge`` the new weight is checked for non-finite values before it replaces the old one.
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.trainable_modules:
                continue
            new_weight = self.merged_weight(name, read_weight(self))
            if safe_merge and not torch.isfinite(new_weight).all():
                raise ValueError(
                    f"NaN/Inf in the merged weight of '{self.module_name}'; adapter '{name}' is broken"
                )
            write_weight(self, new_weight)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.trainable_modules:
                write_weight(self, self.unmerged_weight(name, read_weight(self)))

    def _guard_4bit_layout(self, x: torch.Tensor) -> None:
        """A forward that needs gradients gets the usual 4-bit layout back (bitsandbytes' CPU inference
        layout has no autograd, and bitsandbytes packs only when neither condition holds); any other
        forward first remembers the exact quantization state, in case bitsandbytes packs (:mod:`.cpu_4bit`).
        """
        if torch.is_grad_enabled() and (self.training or x.requires_grad):
            restore_4bit_layout(self.get_base_layer())
        else:
            remember_4bit_state(self.get_base_layer())

    def active_adapter_names(self) -> list[str]:
        """Active adapters that exist on this layer."""
        return [name for name in self.active_adapters if name in self.trainable_modules]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.quantization_backend is not None:
            self._guard_4bit_layout(x)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def adapter_input(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the adapter consumes it: unchanged under autocast, else cast to the adapter's dtype."""
        if torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(self.adapter_dtype(adapter_name))

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each active adapter's contribution (cast to the output dtype).

        On CUDA a frozen-factor adapter runs as one fused kernel instead (see ``ortho_adapters.kernels``).
        """
        fused = fused_forward(self, x, args, kwargs)
        if fused is not None:
            return fused
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for name in self.active_adapter_names():
            weights = self.sample_weights(name, x)
            delta = self.adapter_output(name, self.adapter_dropout[name](self.adapter_input(name, x)))
            if weights is not None:
                delta = delta * weights.to(delta.dtype)
            result = result + delta.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"{self.__module__.split('.')[-2]}.{super().__repr__()}"
