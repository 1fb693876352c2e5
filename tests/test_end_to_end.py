"""Slow end-to-end checks on the real offline model and data (``pytest -m slow``; CI runs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _accelerate() -> str:
    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.exists() else shutil.which("accelerate") or "accelerate"


def test_two_process_accelerate_run_on_cpu(tmp_path):
    """The main job under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU), tiny config."""
    cmd = [
        _accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "ortho_adapters.cli", "finetune", "--n-train", "64", "--n-eval", "32", "--epochs", "1",
        "--compare", "none", "--init-samples", "16", "--no-progress", "--output-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"][0]["method"] == "lora_sb"
    assert (tmp_path / "lora_sb" / "adapter_model.safetensors").exists()
    assert proc.stdout.count("| lora_sb |") == 1, "only the main process prints the table"


def test_main_job_defaults_meet_the_targets(tmp_path):
    """Main job defaults: LoRA-SB >= frozen-embedding baseline + 3 points with <= 1/20 of LoRA r=8 params."""
    cmd = [
        sys.executable,
        "-m",
        "ortho_adapters.cli",
        "finetune",
        "--no-progress",
        "--output-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    baseline = rows["frozen embeddings + logistic regression"]["accuracy"]
    assert rows["lora_sb"]["accuracy"] >= baseline + 0.03, rows
    assert rows["lora_sb"]["adapter_params"] * 20 <= rows["lora"]["adapter_params"], rows


def test_quickstart_example_runs():
    """examples/quickstart.py: LoRA-SB init, Trainer, save, reload, merge on the real model."""
    script = Path(__file__).parents[1] / "examples" / "quickstart.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    diff = float(proc.stdout.rsplit("differ by ", 1)[1].split()[0])
    assert diff < 1e-4


def test_causal_lm_job_on_rotten_tomatoes(tmp_path):
    """`finetune --model smollm2`, tiny budget: LoRA-SB trains; the table and a valid accuracy come out."""
    cmd = [
        sys.executable, "-m", "ortho_adapters.cli", "finetune", "--model", "smollm2",
        "--task", "rotten_tomatoes", "--method", "lora_sb", "--compare", "none", "--n-train", "32",
        "--n-eval", "32", "--init-samples", "16", "--targets", "q_proj,v_proj", "--no-progress",
        "--output-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| lora_sb |" in proc.stdout and "| lora_sb |" in (tmp_path / "results.md").read_text()
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["extra"]["n_eval"] == 32
    assert row["adapter_params"] == 16 * 16 * 2 * 30  # r^2 per adapted matrix, 2 projections x 30 layers
    assert row["peak_rss_mb"] > 0 and row["eval_seconds"] > 0
    assert (tmp_path / "lora_sb" / "adapter_model.safetensors").exists()
