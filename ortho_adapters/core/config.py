"""Fields and validation shared by every ortho_adapters config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from peft.config import PeftConfig

from ..registry import peft_type


@dataclass
class OrthoAdapterConfig(PeftConfig):
    """Base config: rank, targets and the PEFT conventions every method shares.

    Subclasses set ``PEFT_TYPE_NAME`` (a key of :data:`ortho_adapters.registry.PEFT_TYPES`).
    ``target_modules=None`` picks PEFT's LoRA defaults for known architectures.
    """

    PEFT_TYPE_NAME: ClassVar[str] = ""
    # Whether ``r=None`` is allowed, meaning the largest rank each adapted layer supports.
    FULL_RANK_WHEN_NONE: ClassVar[bool] = False

    r: Optional[int] = field(default=8, metadata={"help": "Rank of the adapter."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt; 'all-linear' for every linear layer but the head."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True for layers that store weight as (in, out), e.g. GPT-2's Conv1D."},
    )
    bias: str = field(
        default="none",
        metadata={
            "help": "Biases to train (PEFT's convention): 'none', 'all' (every bias of the model) or "
            "'<method>_only' (e.g. 'lora_sb_only': the biases of the adapted layers)."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "PEFT's convention: True = the method's own initialization (see its config); False = a "
            "random, non-identity start (for tests and debugging)."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules (e.g. a classifier head) trained fully and saved."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    use_kernels: bool = field(
        default=True,
        metadata={
            "help": "Use the fused Triton kernels where they apply (CUDA, frozen-factor methods; see "
            "ortho_adapters.kernels); False keeps the PyTorch path. Does not change results beyond rounding."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type(self.PEFT_TYPE_NAME)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.r is None and not self.FULL_RANK_WHEN_NONE:
            raise ValueError(f"`r` must be a positive integer for {type(self).__name__}, got None")
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0):
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")
        allowed_bias = ("none", "all", self.PEFT_TYPE_NAME.lower() + "_only")
        if self.bias not in allowed_bias:
            raise ValueError(
                f"`bias` must be one of {allowed_bias} for {type(self).__name__}, got {self.bias!r}"
            )
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"`init_weights` must be True or False, got {self.init_weights!r}")
        if not isinstance(self.use_kernels, bool):
            raise ValueError(f"`use_kernels` must be True or False, got {self.use_kernels!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform` too")
