"""The continual benchmark script end to end at a tiny size (slow): tuning on validation, every arm, the
table and the metrics against a hand computation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).parents[1] / "scripts"


def test_benchmark_runs_end_to_end_at_tiny_size(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    import continual_benchmark as bench

    out = tmp_path / "c"
    argv = ["--output-dir", str(out), "--n-train", "16", "--n-val", "8", "--n-test", "8", "--n-tasks", "2"]
    argv += ["--n-orders", "2", "--epochs", "1", "--lr-grid", "1e-3", "3e-3", "--lr-grid-osf", "1e-4"]
    argv += ["--stats-examples", "8", "--seeds", "0", "1", "--no-progress", "--jobs", "2"]
    results = bench.main(argv)
    cells = {arm: [] for arm in ("seq_lora", "olora", "subspace", "gradient", "scaled", "osf")}
    for arm, found in cells.items():
        # validation tuning: every sequential arm tried its grid, and the chosen lr is the grid's best
        grid = results["tuning"][arm]
        assert results["lr"][arm] == max(grid, key=grid.get)
        for seed in ("0", "1"):
            for order in results["seeds"][seed][arm]["orders"]:
                R = order["R"]
                assert [len(row) for row in R] == [1, 2]
                assert order["AA"] == pytest.approx((R[1][0] + R[1][1]) / 2)
                assert order["BWT"] == pytest.approx(R[1][0] - R[0][0])
                found.append(order)
        assert results[arm]["mean_AA"] == pytest.approx(sum(o["AA"] for o in found) / 4)
        assert results[arm]["runs"] == 4
        by_position = [sum(o["R"][i][i] for o in found) / 4 for i in range(2)]
        assert results[arm]["plasticity_by_position"] == pytest.approx(by_position)
        assert results[arm]["plasticity"] == pytest.approx(sum(by_position) / 2)
        assert results[arm]["trainable"] == max(v for o in found for v in o["trainable"]) > 0
    # the new modes train B only: fewer values than LoRA (A and B) and far fewer than osf
    trained = {arm: results[arm]["trainable"] for arm in ("scaled", "gradient", "seq_lora")}
    assert trained["scaled"] == trained["gradient"] < trained["seq_lora"]
    assert results["osf"]["trainable"] > 10 * results["seq_lora"]["trainable"]
    assert len(results["seeds"]["1"]["multitask_lora"]["accuracy"]) == 2
    # the seeds draw different data: zero-shot accuracies on the two test draws are not all equal
    assert results["seeds"]["0"]["zero_shot"] != results["seeds"]["1"]["zero_shot"]
    assert (out / "results.md").read_text().startswith("| arm | seed 0 AA / BWT | seed 1 AA / BWT |")
    assert json.loads((out / "results.json").read_text())["lr"] == results["lr"]
    assert (out / "per_task_accuracy.png").stat().st_size > 0
    assert (out / "plasticity_by_position.png").stat().st_size > 0
    header = "| arm | mean AA | mean BWT | plasticity | trainable values | minutes |"
    assert header in (out / "results.md").read_text()
    # a later run can take the lrs chosen on validation from this one instead of tuning again
    again = bench.main([*argv, "--output-dir", str(tmp_path / "d"), "--lrs-from", str(out / "results.json"),
                        "--arms", "scaled", "--seeds", "0"])  # fmt: skip
    assert again["lr"]["scaled"] == results["lr"]["scaled"]
    assert again["tuning"]["scaled"] == {str(k): v for k, v in results["tuning"]["scaled"].items()}


def test_splits_are_disjoint_and_test_does_not_depend_on_validation_size():
    sys.path.insert(0, str(SCRIPTS))
    import continual_benchmark as bench

    for task in ("rotten_tomatoes", "sarcasm"):
        small = bench.load_task(task, 20, 5, 10, seed=0)
        big = bench.load_task(task, 20, 30, 10, seed=0)
        assert [e.text for e in small["test"]] == [e.text for e in big["test"]]
        assert [e.text for e in small["train"]] == [e.text for e in big["train"]]
        texts = {k: {e.text for e in v} for k, v in big.items()}
        assert (
            len(texts["val"]) == 30
            and not (texts["val"] & texts["train"])
            and not (texts["val"] & texts["test"])
        )
