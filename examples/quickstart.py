"""Quickstart: LoRA-SB on MiniLM (offline), then save, reload, merge. About a minute on 2 CPU cores.

python examples/quickstart.py            # after `bash scripts/install.sh`
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import ortho_adapters  # noqa: E402  (registers LORA_SB, LOLDU, HUT with PEFT)
from ortho_adapters.jobs.args import FinetuneArgs  # noqa: E402
from ortho_adapters.jobs.encoder import build_classifier, load_task  # noqa: E402


def main() -> None:
    data = load_task(FinetuneArgs(n_train=256, n_eval=128))
    config = ortho_adapters.LoraSBConfig(
        r=16,
        target_modules=["query", "value", "output.dense"],
        init="gradient",
        modules_to_save=["classifier"],
    )
    model = build_classifier(seed=0)
    # LoRA-SB's init: B, R, A from the truncated SVD of the estimated first update -eta * sign(grad).
    # eta is the FIRST optimizer step's learning rate (with warm-up: learning_rate / warmup_steps), not the
    # training learning rate: pass it as step_size=, or let it be derived with learning_rate= + warmup_steps=
    # or training_args=. It warns if the factors raise the loss on its batches (eta too large).
    init = ortho_adapters.initialize_lora_sb(
        model, DataLoader(data["train"], batch_size=16), config=config, step_size=1e-4
    )
    print(f"LoRA-SB init: eta {init.step_size:.3g}, loss {init.loss_before:.4f} -> {init.loss_after:.4f}")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=16, learning_rate=5e-3,
        report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data["train"]).train()

    model.eval()
    batch = data["test"][:8]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = tempfile.mkdtemp()
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors (A, B buffers included)

    reloaded = PeftModel.from_pretrained(build_classifier(seed=0), out).eval()
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        again = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    print(f"saved to {out}; reloaded + merged logits differ by {(again - logits).abs().max():.2e}")


if __name__ == "__main__":
    main()
