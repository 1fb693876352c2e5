"""2-process training on CPU (gloo), launched with the documented ``examples/accelerate/{ddp,fsdp}.yaml``.

DDP goes through ``Accelerator.prepare``; for FSDP the script wraps with FSDP2 ``fully_shard`` itself,
because accelerate leaves its state at MULTI_CPU (no FSDP plugin) on a machine without a GPU.

``tests/distributed_train.py`` trains a tiny Llama with LoRA-SB (gradient init on each process's share of
the init batches, before wrapping), LoLDU (LU of the full weight at creation) and HUT on one global batch
split across the processes. Both ranks must end with identical adapter tensors, equal to one process that
trained on the whole batch (and the training must have moved them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import distributed_train
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("distributed_train.py")
CONFIGS = Path(__file__).parents[1] / "examples" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _accelerate() -> str:
    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.exists() else shutil.which("accelerate") or "accelerate"


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    distributed_train.run("single", out, list(distributed_train.METHODS))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(mode, single_process, tmp_path):
    config = CONFIGS / f"{mode}.yaml"  # the documented config, with 2 processes and fp32 for the comparison
    cmd = [
        _accelerate(), "launch", "--config_file", str(config), "--num_processes", "2",
        "--mixed_precision", "no", str(SCRIPT), "--mode", mode, "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for method in distributed_train.METHODS:
        ranks = [load_file(str(tmp_path / f"{method}-rank{k}.safetensors")) for k in (0, 1)]
        single = load_file(str(single_process / f"{method}-rank0.safetensors"))
        start = load_file(str(single_process / f"{method}-init-rank0.safetensors"))
        assert ranks[0].keys() == ranks[1].keys() == single.keys() and single, method
        moved = max((single[k] - start[k]).abs().max().item() for k in single)
        assert moved > 1e-4, f"{method}: training did not move the adapter ({moved})"
        for key in single:
            torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{mode} {key}")
            torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-5, atol=1e-6, msg=f"{mode} {key}")
