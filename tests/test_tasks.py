"""The multiple-choice tasks (ortho_adapters.tasks): parsers, de-duplication, the generated arithmetic
and the real cached files (fetched by the install step)."""

from __future__ import annotations

import re

import pytest

from ortho_adapters import tasks
from ortho_adapters.jobs.args import FinetuneArgs, resolve
from ortho_adapters.jobs.lm_tasks import get_task

# Rows after de-duplication, counted from the evals==3.0.1.post1 files (logiqa lists every item twice;
# 16 QuaRTz texts appear with both answers and are dropped).
ROWS = {
    "social_iqa": 2203,
    "sarcasm": 28498,
    "quartz": 3828,
    "logiqa": 677,
    "corr2cause": 1522,
    "event_categories": 879,
    "arithmetic": 5000,
}


def _chat(user: str, ideal: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return {"input": messages, "ideal": ideal}


def test_parsers_read_each_layout() -> None:
    siqa = tasks.parse_social_iqa(_chat("Sam cooked. Why? A: hungry; B: bored, tired; C: to eat.", "C"))
    assert siqa == {"input": "Sam cooked. Why?", "choices": ["hungry", "bored, tired", "to eat"], "answer": 2}
    quartz = tasks.parse_quartz(_chat("More heat makes it\n\n A: faster\n B: slower", "B", "sys"))
    assert quartz == {"input": "More heat makes it", "choices": ["faster", "slower"], "answer": 1}
    logiqa = tasks.parse_logiqa(
        _chat("\nPassage: P.Question: Q?\nA. A.one\nB. B.two\nC. C.three\nD. D.four\nAnswer:", "D", "sys")
    )
    assert logiqa == {
        "input": "Passage: P.Question: Q?",
        "choices": ["one", "two", "three", "four"],
        "answer": 3,
    }
    c2c = tasks.EVALS_FILES["corr2cause"].parse(_chat("Premise: p. Hypothesis: h.", "Answer: neutral", "s"))
    assert c2c["choices"][c2c["answer"]] == "neutral"
    sarcasm = tasks.EVALS_FILES["sarcasm"].parse(_chat("headline", "1", "s"))
    assert sarcasm["choices"][sarcasm["answer"]] == "sarcastic"
    with pytest.raises(ValueError, match="unexpected item layout"):
        tasks.parse_quartz(_chat("no options here", "A"))
    with pytest.raises(ValueError, match="not one of"):
        tasks.parse_social_iqa(_chat("x A: a; B: b; C: c.", "D"))


def test_duplicates_kept_once_and_conflicts_dropped() -> None:
    same = _chat("q\n\n A: x\n B: y", "A")
    conflicted = [_chat("c\n\n A: x\n B: y", "A"), _chat("c\n\n A: x\n B: y", "B")]
    rows = tasks.parse_records("quartz", [same, same, *conflicted, _chat("r\n\n A: x\n B: y", "B")])
    assert [r["input"] for r in rows] == ["q", "r"]
    with pytest.raises(ValueError, match=r"quartz: record 2 of quartz/samples.jsonl"):
        tasks.parse_records("quartz", [same, _chat("broken", "A")])


def _evaluate(question: str) -> int:
    """The answer of ``What is a <op> b?`` computed from the text alone (an independent reference)."""
    a, op, b = re.fullmatch(r"What is (\d+) (plus|minus|times|divided by) (\d+)\?", question).groups()
    a, b = int(a), int(b)
    if op == "divided by":
        assert a % b == 0
        return a // b
    return {"plus": a + b, "minus": a - b, "times": a * b}[op]


def test_arithmetic_is_correct_and_seeded() -> None:
    rows = tasks.arithmetic_rows(400, seed=3)
    assert rows == tasks.arithmetic_rows(400, seed=3) and rows != tasks.arithmetic_rows(400, seed=4)
    assert len({r["input"] for r in rows}) == 400
    for row in rows:
        assert len(set(row["choices"])) == 4
        assert int(row["choices"][row["answer"]]) == _evaluate(row["input"])
    positions = [r["answer"] for r in rows]
    assert all(positions.count(k) > 60 for k in range(4))  # the answer is not always in one place


def test_retired_task_names_name_their_replacement() -> None:
    for old, new in tasks.RETIRED_TASKS.items():
        with pytest.raises(ValueError, match=f"{old}.*bigbench==1.0.0.*use '{new}'"):
            tasks.load_task(old)
        with pytest.raises(ValueError, match=f"use '{new}'"):
            get_task(old)
        with pytest.raises(ValueError, match=f"use '{new}'"):
            resolve(FinetuneArgs(model="smollm2", dataset=old))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.load_task("nope")


def test_missing_cache_names_the_fetch_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ORTHO_ADAPTERS_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m ortho_adapters.fetch"):
        tasks.load_task("quartz")


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_real_task(name: str) -> None:
    ds = tasks.load_task(name)
    assert ds.column_names == ["input", "choices", "answer"] and len(ds) == ROWS[name]
    assert all(0 <= a < len(c) for a, c in zip(ds["answer"], ds["choices"]))
    assert len(set(ds["answer"])) > 1 and all(text.strip() for text in ds["input"])
    assert len({(t, tuple(c)) for t, c in zip(ds["input"], ds["choices"])}) == len(ds)  # no duplicates
