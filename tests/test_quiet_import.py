"""``import ortho_adapters`` (and so every command) prints nothing in offline mode, while other records of
the filtered loggers still show."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import logging
import ortho_adapters  # imports peft, which imports bitsandbytes
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'someone/else'")
"""


def test_offline_import_is_silent_but_other_warnings_show() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "another bitsandbytes warning",
        "Skipping publisher trust check for 'someone/else'",
    ]


DEEPSPEED_SCRIPT = """
import ortho_adapters
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import logger
print("accelerator:", get_accelerator().device_name())
logger.warning("another deepspeed warning")
"""


def test_deepspeed_cpu_accelerator_notice_is_dropped_but_other_deepspeed_warnings_show() -> None:
    import importlib.util

    import pytest

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    result = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_SCRIPT], capture_output=True, text=True, env=env, check=True
    )
    output = result.stdout + result.stderr
    assert "accelerator: cpu" in output
    assert "another deepspeed warning" in output
    assert "Setting accelerator to CPU" not in output
