"""Small seeded models for the conformance battery: an MLP, a tiny Llama and a GPT-2 (Conv1D) model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128


class MLP(nn.Module):
    """Two hidden linear layers and a head; ``forward(x, labels=None)`` returns logits (and loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 24)
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class UpDown(nn.Module):
    """Two linear layers (24 -> 40 -> 17, the second without bias): odd widths for the kernel tests."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 17, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def tiny_llama_config(
    vocab_size: int = VOCAB, max_positions: int = 64, hidden: int = 32, intermediate: int = 48
) -> LlamaConfig:
    """A 2-layer Llama config with GQA (4 query heads, 2 key/value heads)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )


def tiny_llama(vocab_size: int = VOCAB, max_positions: int = 64) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, GQA 4/2 heads) with random weights from the global RNG."""
    return LlamaForCausalLM(tiny_llama_config(vocab_size, max_positions))


def tiny_nf4_llama(folder: str, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64: every projection's output is a multiple of 32, as bitsandbytes' CPU
    inference packing needs) saved to ``folder`` and loaded back QLoRA style (nf4, fp32 compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(hidden=64, intermediate=128)).save_pretrained(folder)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32)


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))


@dataclass(frozen=True)
class ModelCase:
    """A base-model factory with its targets and a seeded input batch."""

    name: str
    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    kind: str  # "mlp" | "lm"

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def inputs(self, seed: int = 1) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "mlp":
            return {"x": torch.randn(6, 10, generator=g)}
        return {"input_ids": torch.randint(0, VOCAB, (2, 12), generator=g)}

    def labelled(self, seed: int = 1) -> dict[str, torch.Tensor]:
        batch = self.inputs(seed)
        if self.kind == "mlp":
            batch["labels"] = (batch["x"][:, 0] > 0).long()
        else:
            batch["labels"] = batch["input_ids"].clone()
        return batch


MODEL_CASES = {
    "mlp": ModelCase("mlp", MLP, ("lin0", "lin1"), "mlp"),
    "llama": ModelCase("llama", tiny_llama, ("q_proj", "v_proj"), "lm"),
    "gpt2": ModelCase("gpt2", tiny_gpt2, ("c_attn",), "lm"),
}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out["logits"] if isinstance(out, dict) else out.logits


def tiny_lm_trainer(
    model: nn.Module,
    output_dir: str,
    lr: float,
    steps: int,
    batch_size: int,
    evaluate: bool = False,
    **kwargs,
):
    """A ``Trainer`` on 8 seeded random token sequences (labels = inputs), logging every step, on the CPU;
    ``evaluate`` also gives it those sequences as its evaluation set."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (8, 16), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=lr,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data if evaluate else None)
