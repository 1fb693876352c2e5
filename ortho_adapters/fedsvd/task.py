"""The federated task: MiniLM-L6 (mean pooling + linear head, as the finetune job) on Rotten Tomatoes,
split over clients with Dirichlet label skew, and the four arms' adapters.

Arms (all with the same rank, scaling, targets and head):

* ``fedsvd``: :class:`~ortho_adapters.fedsvd.FedSVDConfig`, ``A`` orthonormal, server step = SVD.
* ``ffa_kaiming``: FFA-LoRA (Sun et al., ICLR 2024): PEFT LoRA with ``lora_A`` frozen at PEFT's kaiming init.
* ``ffa_orthonormal``: FFA-LoRA with ``lora_A`` frozen at the same orthonormal ``A0`` as FedSVD's.
* ``fedavg_lora``: PEFT LoRA, ``A`` and ``B`` both trained and averaged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import TensorDataset

from .aggregate import aggregate, average_trainable
from .config import FedSVDConfig
from .layer import layer_seed, random_orthonormal_rows

ARMS: tuple[str, ...] = ("fedsvd", "ffa_kaiming", "ffa_orthonormal", "fedavg_lora")
HEAD = "classifier"


@dataclass(frozen=True)
class AdapterSpec:
    """What defines an arm's adapter (identical on server and clients)."""

    arm: str
    r: int
    alpha: float
    targets: tuple[str, ...]
    train_head: bool
    seed: int


def frozen_key(arm: str, key: str) -> bool:
    """Whether an adapter state key is frozen (never sent by clients) in ``arm``."""
    if arm == "fedsvd":
        return key.endswith("fedsvd_A")
    if arm in ("ffa_kaiming", "ffa_orthonormal"):
        return ".lora_A." in key
    if arm == "fedavg_lora":
        return False
    raise ValueError(f"unknown arm {arm!r}; known: {ARMS}")


def server_step(arm: str) -> Callable[..., dict[str, torch.Tensor]]:
    """The arm's aggregation ``f(global_state, client_states, num_examples, client_names=...)``."""
    if arm == "fedsvd":
        return aggregate

    def average(global_state, client_states, num_examples, client_names=None):
        frozen = [k for k in global_state if frozen_key(arm, k)]
        return average_trainable(global_state, client_states, num_examples, frozen, client_names)

    return average


def attach_adapter(base: nn.Module, spec: AdapterSpec) -> nn.Module:
    """The arm's PEFT model around ``base`` (only the arm's trainable tensors require grad)."""
    modules_to_save = [HEAD] if spec.train_head else None
    if spec.arm == "fedsvd":
        config = FedSVDConfig(
            r=spec.r,
            alpha=spec.alpha,
            target_modules=list(spec.targets),
            modules_to_save=modules_to_save,
            init_seed=spec.seed,
        )
        return get_peft_model(base, config)
    if spec.arm not in ARMS:
        raise ValueError(f"unknown arm {spec.arm!r}; known: {ARMS}")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=list(spec.targets),
        modules_to_save=modules_to_save,
    )
    g_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)  # PEFT's kaiming init draws from the global RNG: seed it, then restore
    model = get_peft_model(base, config)
    torch.random.set_rng_state(g_state)
    if spec.arm == "ffa_orthonormal":
        with torch.no_grad():
            for name, module in model.base_model.model.named_modules():
                lora_a = getattr(module, "lora_A", None)
                if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
                    weight = lora_a["default"].weight
                    seed = layer_seed(spec.seed, f"{name}.default")  # the A0 FedSVD draws for this layer
                    weight.copy_(random_orthonormal_rows(spec.r, weight.shape[1], seed))
    if spec.arm != "fedavg_lora":
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model


def dirichlet_partition(
    labels: Sequence[int], num_clients: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skewed split: for every class, client shares ~ Dirichlet(alpha); redrawn until every client
    has at least ``min_size`` examples (the usual FL-benchmark procedure)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"could not split {len(labels)} examples over {num_clients} clients with >= {min_size} each"
    )


@functools.lru_cache(maxsize=4)
def tokenized_splits(
    n_train: int, n_eval: int, max_length: int, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Rotten Tomatoes train / held-out test as ``TensorDataset(input_ids, attention_mask, labels)``."""
    from .. import data

    splits = data.load_rotten_tomatoes(n_train=n_train, n_eval=n_eval, seed=seed)
    tokenizer = data.load_minilm_tokenizer()

    def tensors(split) -> TensorDataset:
        enc = tokenizer(
            list(split["text"]),
            truncation=True,
            max_length=max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return TensorDataset(
            enc["input_ids"], enc["attention_mask"], torch.tensor(list(split["label"]), dtype=torch.long)
        )

    return tensors(splits["train"]), tensors(splits["test"])


def client_dataset(
    train: TensorDataset,
    partition_id: int,
    num_partitions: int,
    dirichlet_alpha: float,
    seed: int,
    batch_size: int,
) -> TensorDataset:
    """Client ``partition_id``'s share of ``train`` (Dirichlet(``dirichlet_alpha``) label skew)."""
    parts = dirichlet_partition(
        train.tensors[2].tolist(), num_partitions, dirichlet_alpha, seed, min_size=batch_size
    )
    idx = torch.from_numpy(parts[partition_id])
    return TensorDataset(*(t[idx] for t in train.tensors))


def base_model(seed: int) -> nn.Module:
    """MiniLM + masked mean pooling + a seeded linear head (the finetune job's encoder model)."""
    from ..jobs.encoder import build_classifier

    state = torch.random.get_rng_state()
    model = build_classifier(seed)
    torch.random.set_rng_state(state)
    return model


def loss_of(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of a ``(input_ids, attention_mask, labels)`` batch."""
    input_ids, attention_mask, labels = batch
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, batch_size: int = 128) -> float:
    """Held-out accuracy (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        ids, mask, labels = (t[start : start + batch_size] for t in dataset.tensors)
        logits = model(input_ids=ids, attention_mask=mask).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(dataset)
