"""Train a tiny Llama with several adapter methods on one global batch, single- or multi-process (CPU).

    python tests/distributed_train.py --mode single --out DIR
    accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 --mixed_precision no \
        tests/distributed_train.py --mode ddp --out DIR
    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/distributed_train.py --mode fsdp --out DIR

(``Accelerator(cpu=True)``: on a machine without a GPU, an Accelerator without it reports
``DistributedType.NO`` in every process, which would then train alone.)

Every process builds the same seeded model, adds the adapter (LoRA-SB: ``init="gradient"`` computed by
:func:`ortho_adapters.initialize_lora_sb` from the process's share of the init batches, BEFORE any wrapping,
so that it sees the full weights), then wraps it: ``ddp`` through ``Accelerator.prepare`` (DDP over gloo),
``fsdp`` with FSDP2 ``fully_shard`` per decoder layer and at the root (explicitly: accelerate does not wrap
FSDP on a machine without a GPU). Each process trains on its rows of the global batch (mean token loss,
equal token counts, so the averaged gradient is the single-process gradient of the whole batch) and writes
its adapter tensors (trainable and frozen, full, not sharded) to ``DIR/<method>-rank<k>.safetensors``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import VOCAB, tiny_llama  # noqa: E402

import ortho_adapters  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS = 4, 12, 3
LR = {"lora_sb": 0.5, "loldu": 0.3, "hut": 0.3}  # steps that visibly move each method's few weights
METHODS = {
    "lora_sb": lambda: ortho_adapters.LoraSBConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], init="gradient", inference_mode=False
    ),
    "loldu": lambda: ortho_adapters.LoLDUConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "hut": lambda: ortho_adapters.HUTConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
}


def global_batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def adapted_model(method: str, rank: int, world: int) -> nn.Module:
    """Seeded tiny Llama with the method's adapter; LoRA-SB's gradient init uses this rank's rows."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().train(), METHODS[method]())
    if method == "lora_sb":
        ids = global_batch(1)[rank::world]
        loader = [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(len(ids))]
        ortho_adapters.initialize_lora_sb(model, loader, step_size=0.05, num_samples=None, progress=False)
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and buffers outside the base model's own weights), full, on CPU."""
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "base_layer" in name or not any(p in name for p in ("lora_sb_", "loldu_", "hut_")):
            continue
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1)] = full.detach().cpu().clone()
    return out


def train(model: nn.Module, lr: float, rank: int, world: int, step_hook=None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=lr)
    for step in range(STEPS):
        ids = global_batch(100 + step)[rank::world]
        loss = model(input_ids=ids, labels=ids).loss
        (step_hook or (lambda loss: loss.backward()))(loss)
        optim.step()
        optim.zero_grad(set_to_none=True)


def run(mode: str, out: Path, methods: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if mode == "single":
        rank, world, accelerator = 0, 1, None
    else:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        rank, world = accelerator.process_index, accelerator.num_processes
        if world != 2 or not torch.distributed.is_initialized():
            raise RuntimeError(f"expected 2 processes with a process group, got {world}")
    for method in methods:
        model = adapted_model(method, rank, world)
        save_file(adapter_tensors(model), str(out / f"{method}-init-rank{rank}.safetensors"))
        if mode == "ddp":
            wrapped = accelerator.prepare(model)
            train(wrapped, LR[method], rank, world, accelerator.backward)
            model = accelerator.unwrap_model(wrapped)
        elif mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            if not any(type(p).__name__ == "DTensor" for p in model.parameters() if p.requires_grad):
                raise RuntimeError("fully_shard left the trainable parameters unsharded")
            train(model, LR[method], rank, world)
        else:
            train(model, LR[method], rank, world)
        save_file(adapter_tensors(model), str(out / f"{method}-rank{rank}.safetensors"))
        if accelerator is not None:
            accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run(args.mode, args.out, args.methods)


if __name__ == "__main__":
    main()
