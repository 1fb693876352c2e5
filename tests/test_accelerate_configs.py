"""The documented ``examples/accelerate/*.yaml`` load as accelerate configs with the settings the README
relies on (adapters built on full weights before sharding; FSDP2, so trainable leaves need no flat-param
rules; DeepSpeed ZeRO-3 partitions at load). The 2-process runs with the DDP and FSDP files are in
``test_distributed.py``, with DeepSpeed in ``test_deepspeed_zero3.py`` (both slow)."""

from __future__ import annotations

import json
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
    if name == "deepspeed_zero3":  # the DeepSpeed settings are in the JSON file the yaml names
        ds_file = Path(__file__).parents[1] / config.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == 3
        # accelerate on a CPU machine fills a wrong train_batch_size: DeepSpeed must derive it itself
        assert "train_batch_size" not in ds and ds["train_micro_batch_size_per_gpu"] == "auto"
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert config.deepspeed_config["zero3_init_flag"] is True  # accelerate 1.16 does it at stage 3 anyway
