"""Registration into PEFT: enum members, idempotent import, clash detection, fresh-process loading."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import ortho_adapters
from ortho_adapters import registry


def test_every_contract_type_is_a_peft_type_member():
    for name in registry.PEFT_TYPES:
        member = registry.peft_type(name)
        assert member is PeftType[name] is PeftType(name)
        assert member.name == member.value == name and isinstance(member, str)
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LORA_SB] == "lora_sb_"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA_SB] is ortho_adapters.LoraSBConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA_SB] is ortho_adapters.LoraSBModel


def test_config_peft_type_is_the_enum_member_and_round_trips(tmp_path):
    config = ortho_adapters.LoraSBConfig(r=4, target_modules=["q_proj"])
    assert config.peft_type is PeftType.LORA_SB
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ortho_adapters.LoraSBConfig) and loaded.r == 4


def test_importing_twice_is_harmless():
    before = dict(PEFT_TYPE_TO_CONFIG_MAPPING)
    members = list(PeftType)
    importlib.reload(registry)
    importlib.reload(ortho_adapters)
    registry.register("LORA_SB", ortho_adapters.LoraSBConfig, ortho_adapters.LoraSBModel)
    assert list(PeftType) == members
    assert set(PEFT_TYPE_TO_CONFIG_MAPPING) == set(before)


def test_clash_with_a_peft_builtin_fails_clearly(monkeypatch):
    monkeypatch.setitem(registry.PEFT_TYPES, "LORA", "lora_")
    with pytest.raises(ValueError, match="PEFT itself already defines PeftType.LORA"):
        registry.peft_type("LORA")
    with pytest.raises(ValueError, match="not an ortho_adapters PEFT type"):
        registry.peft_type("NOT_A_METHOD")


def test_loading_without_import_gives_keyerror_and_with_import_works(tmp_path):
    config = ortho_adapters.LoraSBConfig(r=4, target_modules=["q_proj"])
    config.save_pretrained(tmp_path)
    load = f"from peft import PeftConfig; print(type(PeftConfig.from_pretrained({str(tmp_path)!r})).__name__)"
    without = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert without.returncode != 0 and "KeyError" in without.stderr and "LORA_SB" in without.stderr
    with_import = subprocess.run(
        [sys.executable, "-c", "import ortho_adapters; " + load], capture_output=True, text=True, timeout=120
    )
    assert with_import.returncode == 0, with_import.stderr[-2000:]
    assert with_import.stdout.strip() == "LoraSBConfig"
