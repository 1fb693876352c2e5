"""Slow O3 checks: the real MiniLM detector, and the benchmark script end to end at a tiny size."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from o3_helpers import lm_tokenizer, math_rows, review_texts, tiny_detector_dir, tiny_lm
from peft import get_peft_model

import ortho_adapters
from ortho_adapters import data
from ortho_adapters.o3 import unlearn

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).parents[1] / "scripts"


def test_minilm_detector_separates_forget_from_kept():
    tok = lm_tokenizer()
    model = get_peft_model(tiny_lm(len(tok)), ortho_adapters.O3Config(r=4))  # default detector: MiniLM
    unlearn(model, math_rows(30), "math", tokenizer=tok, epochs=1, lr=1e-2, detector_epochs=1)
    gate = model.base_model.o3_gate_state.gates["default"]
    assert gate.detector.path == str(data.minilm_dir())
    assert gate.stats["math"].mean.shape == (6, 384)  # six MiniLM layers, 384 wide
    unseen = [r["prompt"] for r in math_rows(40)[30:]]  # new items of the forgotten task (larger numbers)
    assert float(model.gate_weights(review_texts()).max()) == 0.0  # default 1 / 2 ramp: kept text shut out
    # these unseen items drift (larger numbers) beyond the 6 held-out ones: the narrow default passes only
    # some of them; the wide ramp (docs/o3.md: the trade-off) passes them and still shuts out kept text
    model.set_gate_ramp(3.0, 12.0)
    forget, kept = model.gate_weights(unseen), model.gate_weights(review_texts())
    assert float(forget.mean()) > 0.5 and float(kept.max()) == 0.0, (forget, kept)
    scores_forget, scores_kept = model.gate_scores(unseen)["math"], model.gate_scores(review_texts())["math"]
    assert float(scores_forget.min()) > float(scores_kept.max())  # AUROC 1


def test_benchmark_runs_end_to_end_at_tiny_size(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    import o3_benchmark

    args = o3_benchmark.parse(
        [
            "--tiny",
            "--tiny-detector",
            str(tiny_detector_dir(tmp_path)),
            "--n-train",
            "6",
            "--n-eval",
            "4",
            "--n-val",
            "3",
            "--finetune-epochs",
            "1",
            "--unlearn-epochs",
            "1",
            "--detector-epochs",
            "1",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    report = o3_benchmark.run(args)
    chosen = report["detector"]["ramp"]["chosen"]
    assert tuple(chosen) in args.ramp_grid and len(report["detector"]["ramp"]["grid"]) == len(args.ramp_grid)
    expected_rows = {
        "before unlearning",
        "O3, gate on (default ramp 1/2)",
        f"O3, gate on (ramp {chosen[0]:g}/{chosen[1]:g} chosen on validation)",
        "O3, gate off",
        "gradient-ascent LoRA",
        "random-label LoRA",
    }
    assert set(report["results"]) == expected_rows
    assert 0.0 <= report["detector"]["auroc"] <= 1.0
    assert (tmp_path / "b" / "results.md").read_text().startswith("| model |")
    assert (tmp_path / "b" / "o3_adapter" / "adapter_model.safetensors").exists()
    metrics = pytest.importorskip("sklearn.metrics")
    pos, neg = np.array([2.0, 3.0, 0.5, 2.0]), np.array([1.0, 2.0, 0.7])
    ref = metrics.roc_auc_score([1] * 4 + [0] * 3, np.concatenate([pos, neg]))
    assert o3_benchmark.auroc(pos, neg) == pytest.approx(ref)
