"""Merge the per-arm ``results.json`` files under a folder into one causal-LM table.

python scripts/collect_results.py outputs/causal_lm_rt      # prints it and writes results.md / .json there
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ortho_adapters.jobs.report import RunResult, format_lm_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    rows, sources = [], []
    for path in sorted(args.folder.glob("*/results.json"), key=lambda p: p.stat().st_mtime):
        for row in json.loads(path.read_text())["rows"]:
            rows.append(RunResult.from_dict(row))
            sources.append(path.parent.name)
    table = format_lm_table(rows)
    write_results(args.folder, table, {"sources": sources}, rows)
    print(table)


if __name__ == "__main__":
    main()
