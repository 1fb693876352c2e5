"""Result rows of the jobs, their markdown tables, results files and the process's peak memory."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    """One row of a results table (one arm)."""

    method: str
    accuracy: float
    adapter_params: int
    seconds_per_step: float = float("nan")
    train_seconds: float = float("nan")
    eval_seconds: float = float("nan")
    peak_rss_mb: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_seconds(self) -> float:
        """Train (including any data-driven init) + evaluation time."""
        train = 0.0 if math.isnan(self.train_seconds) else self.train_seconds
        return train + self.eval_seconds

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> RunResult:
        """Inverse of :meth:`to_dict` (``None`` numbers back to NaN)."""
        values = {k: v for k, v in row.items() if k in cls.__dataclass_fields__}
        return cls(**{k: float("nan") if v is None and k != "extra" else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """The row as strict JSON values (NaN -> ``None``)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


def _num(value: float, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def format_table(rows: list[RunResult]) -> str:
    """Markdown table of the encoder job (accuracy, adapter values, seconds per step)."""
    lines = ["| method | held-out accuracy | adapter params | s / step |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.method} | {row.accuracy:.4f} | {row.adapter_params:,} | "
            f"{_num(row.seconds_per_step, '.3f')} |"
        )
    return "\n".join(lines)


def format_lm_table(rows: list[RunResult]) -> str:
    """Markdown table of the causal-LM job: one row per arm with its cost."""
    header = [
        "arm", "r", "lr", "targets", "held-out accuracy", "adapter values", "train s", "eval s", "wall s",
        "peak RSS MB",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        e = row.extra
        cells = [
            row.method + (" (4-bit)" if e.get("quantize") else ""),
            "-" if e.get("r") is None else str(e["r"]),
            "-" if e.get("lr") is None else f"{e['lr']:g}",
            str(e.get("targets", "-")),
            f"{row.accuracy:.4f}",
            f"{row.adapter_params:,}",
            _num(row.train_seconds, ".0f"),
            _num(row.eval_seconds, ".0f"),
            _num(row.wall_seconds, ".0f"),
            _num(row.peak_rss_mb, ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, table: str, args: dict[str, Any], rows: list[RunResult]) -> None:
    """``results.md`` (the table) and ``results.json`` (arguments and rows) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    payload = {"args": args, "rows": [r.to_dict() for r in rows]}
    (out / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=False))
