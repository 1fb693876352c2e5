"""Run by test_continual_distributed under ``accelerate launch --multi_gpu --num_processes 2`` (gloo, CPU).

Each rank sees a different task's data (rank k: ``task_batches(k)``) and runs ``start_task`` / ``end_task`` on
the DDP-wrapped model; it writes its bases ``M`` and its new ``A`` per layer to ``OUT/rank<k>.safetensors``.

usage: accelerate launch ... continual_ddp_check.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import Accelerator
from continual_helpers import inputs_only, make_model, task_batches
from safetensors.torch import save_file

from ortho_adapters.continual import OrthoLoraLayer, end_task, start_task


def main(out: str) -> None:
    acc = Accelerator(cpu=True)  # gloo on CPU
    assert acc.num_processes == 2, acc.num_processes
    rank = acc.process_index
    model = acc.prepare(make_model("subspace"))  # DistributedDataParallel(PeftModel)
    data = inputs_only(task_batches(rank))
    start_task(model, "a", data)
    end_task(model, data)
    start_task(model, "b", inputs_only(task_batches(2 + rank)))
    tensors = {}
    for name, module in acc.unwrap_model(model).named_modules():
        if isinstance(module, OrthoLoraLayer):
            tensors[f"{name}.M"] = module.basis("default").contiguous()
            tensors[f"{name}.A"] = module.current_a("default").contiguous()
    save_file(tensors, str(Path(out) / f"rank{rank}.safetensors"))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
