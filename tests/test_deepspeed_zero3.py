"""DeepSpeed ZeRO-3 (and ZeRO-2) on CPU, 2 processes, against one process on the same global batch.

``tests/deepspeed_train.py`` trains every config (the six methods; LoRA-SB with its SVD init and with its
gradient init computed before and after ``deepspeed.initialize``; HUT ``auto`` and ``factored``; continual
LoRA in both modes) on a tiny Llama under ``torchrun --nproc_per_node 2`` + ``deepspeed.initialize``
(``DS_ACCELERATOR=cpu``, gloo), with the base weights partitioned at load (transformers' ``zero.Init``) and
partitioned by ``deepspeed.initialize`` only. Per config:

* both ranks end with identical adapter tensors and outputs;
* equal to one process that trained on the whole batch within 1e-4 (adapter tensors, logits of an eval
  batch and of a one-token forward, before and after training; greedy ``generate`` tokens equal); the
  forwards run outside the DeepSpeed engine (as ``generate`` does), HUT's one-token forward on its
  factored path;
* training moved the adapter;
* the adapter written by a plain ``save_pretrained`` on every process reloads in a fresh process to the
  trained logits.

One launch per partition mode (all configs in it); about 30 s each on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import deepspeed_train
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).with_name("deepspeed_train.py")
ENV = {
    **os.environ,
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
RUNS = {
    "zero3-load": ("zero3", "load"),
    "zero3-prepare": ("zero3", "prepare"),
    "zero2-prepare": ("zero2", "prepare"),
}
TOL = 1e-4


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    _run([sys.executable, str(SCRIPT), "--mode", "single", "--out", str(out)])
    return out


@pytest.mark.parametrize("tag", list(RUNS))
def test_two_processes_match_one_process_and_reload(tag, out):
    mode, partition = RUNS[tag]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(SCRIPT), "--mode", mode, "--partition", partition, "--out", str(out)])
    _run([sys.executable, str(SCRIPT), "--mode", "reload", "--out", str(out), "--tags", tag])
    for name in deepspeed_train.CONFIGS:
        single = load_file(str(out / "single" / f"{name}-rank0.safetensors"))
        start = load_file(str(out / "single" / f"{name}-init-rank0.safetensors"))
        ranks = [load_file(str(out / tag / f"{name}-rank{k}.safetensors")) for k in (0, 1)]
        reloaded = load_file(str(out / tag / f"{name}-reload.safetensors"))
        assert ranks[0].keys() == ranks[1].keys() == single.keys(), name
        adapter = [k for k in single if k.startswith("adapter.")]
        assert adapter, name
        moved = max((single[k] - start[k.removeprefix("adapter.")]).abs().max().item() for k in adapter)
        assert moved > TOL, f"{name}: training did not move the adapter ({moved})"
        moved = (single["logits"] - single["start.logits"]).abs().max().item()
        assert moved > TOL, f"{name}: training did not move the logits ({moved})"
        for key in single:
            msg = f"{tag} {name} {key}"
            torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=msg)
            if single[key].is_floating_point():
                torch.testing.assert_close(ranks[0][key], single[key], rtol=0, atol=TOL, msg=msg)
            else:
                assert torch.equal(ranks[0][key], single[key]), msg
        for key, value in reloaded.items():
            msg = f"{tag} {name} reloaded {key}"
            if value.is_floating_point():
                torch.testing.assert_close(value, ranks[0][key], rtol=0, atol=1e-6, msg=msg)
                torch.testing.assert_close(value, single[key], rtol=0, atol=TOL, msg=msg)
            else:
                assert torch.equal(value, ranks[0][key]), msg
