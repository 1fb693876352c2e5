"""The documented ``examples/accelerate/*.yaml`` load as accelerate configs with the settings the README
relies on (adapters built on full weights before sharding; FSDP2, so trainable leaves need no flat-param
rules). The 2-process runs with the DDP and FSDP files are in ``test_distributed.py`` (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).parents[1] / "examples" / "accelerate"


@pytest.mark.parametrize(
    "name, kind", [("ddp", DistributedType.MULTI_GPU), ("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")]
)
def test_config_loads(name, kind):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_init_flag"] is False
