"""``scripts/continual_causal_lm.py`` (SmolLM2 answering in text) end to end at a tiny size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.slow  # SmolLM2-135M, six arms, two tasks: about a minute on the 2-core machine
def test_causal_lm_benchmark_runs_end_to_end_at_tiny_size(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    import continual_causal_lm as bench

    threads = torch.get_num_threads()
    out = tmp_path / "c"
    arms = ["seq_lora", "olora", "subspace", "gradient", "osf", "multitask_lora"]
    argv = ["--output-dir", str(out), "--tasks", "rotten_tomatoes", "arithmetic", "--arms", *arms]
    argv += ["--n-train", "8", "--n-test", "8", "--batch-size", "4", "--stats-examples", "8", "--no-progress"]
    argv += ["--threads", str(threads + 1)]
    results = bench.main(argv)
    assert torch.get_num_threads() == threads  # main() gives the caller its thread count back
    for arm in arms[:-1]:
        r = results["arms"][arm]
        R = r["R"]
        assert [len(row) for row in R] == [1, 2] and all(0 <= a <= 1 for row in R for a in row)
        assert r["AA"] == pytest.approx((R[1][0] + R[1][1]) / 2)
        assert r["BWT"] == pytest.approx(R[1][0] - R[0][0])
        assert r["plasticity"] == pytest.approx((R[0][0] + R[1][1]) / 2)
        assert len(r["losses"]) == 2 and all(len(step) == 2 for step in r["losses"])  # 8 examples / batch 4
    trainable = {arm: max(results["arms"][arm]["trainable"]) for arm in arms}
    assert trainable["subspace"] == trainable["gradient"] < trainable["seq_lora"] == trainable["olora"]
    assert trainable["osf"] > 10 * trainable["seq_lora"]
    assert len(results["arms"]["multitask_lora"]["accuracy"]) == 2
    # zero-shot and chance are those of the 8 test items: arithmetic has 4 choices, Rotten Tomatoes 2
    assert results["chance"] == pytest.approx({"rotten_tomatoes": 0.5, "arithmetic": 0.25})
    saved = json.loads((out / "results.json").read_text())
    assert saved["arms"]["subspace"]["R"] == results["arms"]["subspace"]["R"]
    assert "| subspace | " in (out / "results.md").read_text()
    png = out / "accuracy.png"
    assert png.stat().st_size > 0
    png.unlink()
    bench.main(["--output-dir", str(out), "--plot-only"])  # redraws from results.json alone
    assert png.stat().st_size > 0
