"""The markdown table and the JSON details of a run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .classify import BUCKETS, CONTROL_TOO, GAP, MethodResult, group_by_message

COLUMNS = {
    "passed": "passed",
    "failed_where_control_passes": "failed (control passes)",
    "not_applicable": "declared n/a",
    "control_too": "skipped/failed for control too",
    "skipped_where_control_passes": "skipped (control passes)",
    "unpaired": "unpaired",
}


def table(results: dict[str, MethodResult], control: Counter) -> str:
    """One row per method, a column per bucket, and the control's own statuses below."""
    lines = [
        "| method | tests | " + " | ".join(COLUMNS[b] for b in BUCKETS) + " |",
        "|---|---:|" + "---:|" * len(BUCKETS),
    ]
    for method, result in results.items():
        counts = result.counts()
        lines.append(f"| {method} | {result.total} | " + " | ".join(str(counts[b]) for b in BUCKETS) + " |")
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(control.items()))
    lines.append(f"\ncontrol (DeloraConfig) tests paired with ours: {sum(control.values())} ({statuses})")
    return "\n".join(lines)


def failures(results: dict[str, MethodResult], bucket: str = GAP, examples: int = 3) -> str:
    """Per method, the ids of ``bucket`` grouped by their first error line (most frequent first)."""
    out = []
    for method, result in results.items():
        entries = result.buckets[bucket]
        if not entries:
            continue
        out.append(f"\n### {method}: {len(entries)} {COLUMNS[bucket]}")
        for message, ids in group_by_message(entries).items():
            shown = ", ".join(f"`{i}`" for i in ids[:examples])
            more = f" (+{len(ids) - examples} more)" if len(ids) > examples else ""
            out.append(f"- **{len(ids)}x** `{message[:300]}`: {shown}{more}")
    return "\n".join(out)


def markdown(results: dict[str, MethodResult], control: Counter, meta: dict) -> str:
    head = f"PEFT {meta['peft_version']} test_custom_models.py, {meta['runtime_s']:.0f} s"
    body = [head, "", table(results, control), failures(results, GAP), failures(results, CONTROL_TOO, 1)]
    return "\n".join(part for part in body if part)


def to_json(results: dict[str, MethodResult], control: Counter, meta: dict) -> dict:
    return {
        **meta,
        "control": dict(control),
        "methods": {
            method: {
                "counts": result.counts(),
                "failure_groups": group_by_message(result.buckets[GAP]),
                **{b: [e.as_dict() for e in entries] for b, entries in result.buckets.items()},
            }
            for method, result in results.items()
        },
    }


def write_json(path: Path | str, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return path
