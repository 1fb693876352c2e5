"""DeepSpeed ZeRO-3 / ZeRO-2 on CPU: every method's config trains a tiny Llama, 2 processes against one.

    python tests/deepspeed_train.py --mode single --out DIR          # reference (writes DIR/base first)
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/deepspeed_train.py \
        --mode zero3 --partition load --out DIR                      # or --mode zero2 / --partition prepare
    python tests/deepspeed_train.py --mode reload --out DIR --tags zero3-load zero3-prepare

``--partition load``: the base weights are partitioned while ``from_pretrained`` loads them (transformers'
``zero.Init``, via ``HfDeepSpeedConfig``), so ``get_peft_model`` and LoRA-SB's gradient init see only
partitions; ``prepare``: the model is loaded whole and ``deepspeed.initialize`` partitions it (here
transformers knows nothing of DeepSpeed, so the package must find the partitions by itself).
``stage3_param_persistence_threshold: 0``: else a model this small is never partitioned at all.

For each config every process builds the same seeded adapter, trains ``STEPS`` SGD steps on its rows of one
global batch (mean token loss, equal token counts: the averaged gradient is the single process's gradient of
the whole batch), then writes to ``DIR/<tag>/``:

* ``<config>-rank<k>.safetensors``: the full adapter tensors after training (gathered by this script
  itself) and, before (``start.*``, on a fresh engine) and after training, the tokens of a greedy
  ``generate`` with a KV cache and the logits of an evaluation batch and of a one-token forward (HUT's
  ``auto`` takes its factored path for one token), all called on the model itself, outside the engine;
* ``<config>/``: ``save_pretrained`` called on every process right after training (``is_main_process`` =
  rank 0);
* ``<config>-init-rank<k>.safetensors``: the adapter before training (single mode).

``reload`` loads each saved adapter onto the base model in this fresh process and writes its logits to
``DIR/<tag>/<config>-reload.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import VOCAB, tiny_llama  # noqa: E402

import ortho_adapters  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS = 4, 12, 3
LR = {"hut": 20.0, "hut_factored": 20.0}  # SGD; HUT scales tiny (std 0.02) weights: a large step
TARGETS = ["q_proj", "v_proj", "down_proj"]
CONFIGS = {
    "lora_sb": lambda: ortho_adapters.LoraSBConfig(r=4, target_modules=TARGETS),
    # gradient init before deepspeed.initialize (on partitions with --partition load) and after it
    "lora_sb_gradient": lambda: ortho_adapters.LoraSBConfig(r=4, target_modules=TARGETS, init="gradient"),
    "lora_sb_gradient_after": lambda: ortho_adapters.LoraSBConfig(
        r=4, target_modules=TARGETS, init="gradient"
    ),
    "loldu": lambda: ortho_adapters.LoLDUConfig(r=4, target_modules=TARGETS),
    "hut": lambda: ortho_adapters.HUTConfig(r=4, target_modules=TARGETS, init_weights=False),
    "hut_factored": lambda: ortho_adapters.HUTConfig(
        r=4, target_modules=TARGETS, init_weights=False, execution="factored"
    ),
    "fedsvd": lambda: ortho_adapters.FedSVDConfig(r=4, target_modules=TARGETS),
    "o3": lambda: ortho_adapters.O3Config(r=4, target_modules=TARGETS, gate=False),
    "ortho_lora_subspace": lambda: ortho_adapters.OrthoLoraConfig(r=4, alpha=4.0, target_modules=TARGETS),
    "ortho_lora_olora": lambda: ortho_adapters.OrthoLoraConfig(
        r=4, alpha=4.0, target_modules=TARGETS, mode="olora"
    ),
}


def ids(seed: int, rows: int = GLOBAL_BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def ds_config(stage: int, world: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def base_model(out: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)


def lora_sb_init(model: nn.Module, rank: int, world: int) -> None:
    rows = ids(1)[rank::world]
    loader = [{"input_ids": rows[i : i + 1], "labels": rows[i : i + 1]} for i in range(len(rows))]
    ortho_adapters.initialize_lora_sb(model, loader, step_size=0.05, num_samples=None, progress=False)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the tuner layers outside their base layers, full (ZeRO-3 partitions gathered)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]

    def ours(name: str) -> bool:
        return any(name.startswith(layer + ".") for layer in layers) and ".base_layer." not in name

    params = [(n, p) for n, p in model.named_parameters() if ours(n)]
    zero3 = [p for _, p in params if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    else:
        from contextlib import nullcontext

        gather = nullcontext()
    with gather:
        out = {n: p.detach().clone() for n, p in params}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if ours(n)})
    return out


@torch.no_grad()
def outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Greedy tokens, the logits of an evaluation batch and of a one-token forward (the model is called
    directly, not through a DeepSpeed engine, in eval mode; it is left in training mode)."""
    model.eval()
    generated = model.generate(
        input_ids=ids(9, 1, 4), max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=True
    )
    out = {
        "generated": generated.contiguous(),
        "logits": model(input_ids=ids(7, 2)).logits.contiguous(),
        "one_token": model(input_ids=ids(8, 1, 1)).logits.contiguous(),
    }
    model.train()
    return out


def run_config(name: str, mode: str, partition: str, out: Path, rank: int, world: int) -> None:
    engine = None
    torch.manual_seed(1)
    if mode == "single":
        model = get_peft_model(base_model(out).train(), CONFIGS[name]())
        if name.startswith("lora_sb_gradient"):
            lora_sb_init(model, 0, 1)
        save_file(adapter_tensors(model), str(out / "single" / f"{name}-init-rank0.safetensors"))
        start = outputs(model)  # outside the engine: generate() with HUT's two paths (a fresh engine for DS)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.SGD(params, lr=LR.get(name, 0.5))
        for step in range(STEPS):
            rows = ids(100 + step)
            model(input_ids=rows, labels=rows).loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
    else:
        import deepspeed

        config = ds_config(3 if mode == "zero3" else 2, world)
        keep = None
        if partition == "load":
            from transformers.integrations import HfDeepSpeedConfig

            keep = HfDeepSpeedConfig(config)  # noqa: F841  (transformers' zero.Init while it lives)
        model = get_peft_model(base_model(out).train(), CONFIGS[name]())
        if partition == "load" and not any(
            hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()
        ):
            raise RuntimeError("the base weights were not partitioned at load")
        if name == "lora_sb_gradient":
            lora_sb_init(model, rank, world)
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(params, lr=LR.get(name, 0.5)), config=config
        )
        if mode == "zero3" and not all(p.numel() == 0 for p in model.parameters() if p.requires_grad):
            raise RuntimeError("ZeRO-3 left trainable parameters unpartitioned")
        if name == "lora_sb_gradient_after":
            lora_sb_init(model, rank, world)
        start = outputs(model)  # outside the engine: generate() with HUT's two paths (a fresh engine for DS)
        for step in range(STEPS):
            rows = ids(100 + step)[rank::world]
            loss = engine(input_ids=rows, labels=rows).loss
            engine.backward(loss)
            engine.step()
        del keep
    tag = out / (mode if mode == "single" else f"{mode}-{partition}")
    model.save_pretrained(str(tag / name), is_main_process=rank == 0)  # right after training
    result = {f"adapter.{k}": v for k, v in adapter_tensors(model).items()}
    result.update(outputs(model), **{f"start.{k}": v for k, v in start.items()})
    save_file(result, str(tag / f"{name}-rank{rank}.safetensors"))
    if engine is not None:
        engine.destroy()
        torch.distributed.barrier()


def reload(out: Path, tags: list[str], names: list[str]) -> None:
    for tag in tags:
        for name in names:
            model = PeftModel.from_pretrained(base_model(out), str(out / tag / name))
            save_file(outputs(model), str(out / tag / f"{name}-reload.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["single", "zero3", "zero2", "reload"], required=True)
    parser.add_argument("--partition", choices=["load", "prepare"], default="prepare")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tags", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*no gradient factors yet.*")
    start = time.perf_counter()
    if args.mode == "reload":
        reload(args.out, args.tags, args.configs)
        return
    if args.mode == "single":
        rank, world = 0, 1
        torch.manual_seed(0)
        tiny_llama().save_pretrained(args.out / "base")
    else:
        import deepspeed

        if args.mode == "zero2" and args.partition == "load":
            raise SystemExit("--partition load is a ZeRO-3 feature")
        deepspeed.init_distributed()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if world != 2:
            raise RuntimeError(f"expected 2 processes, got {world}")
    tag = args.mode if args.mode == "single" else f"{args.mode}-{args.partition}"
    (args.out / tag).mkdir(parents=True, exist_ok=True)
    for name in args.configs:
        run_config(name, args.mode, args.partition, args.out, rank, world)
    if rank == 0:
        print(f"{tag}: {len(args.configs)} configs in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
