"""PEFT's own tuner tests on our methods, each judged against the built-in DeLoRA on the same test.

    python scripts/peft_conformance.py [--methods lora_sb,loldu,hut] [-k EXPR] [--keep] [--json PATH]

Runs ``tests/test_custom_models.py`` of the installed peft's sdist (cached by ``python -m
ortho_adapters.fetch``; downloaded here once if missing) with our rows added next to DeLoRA's, prints
a markdown table (per method: passed / failed where the control passes / declared not applicable /
skipped or failed for the control too) and the failures grouped by their first error line, and writes
the per-test details as JSON. Exits 1 when any test fails for us but passes for the control.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from peft_suite import cases  # noqa: E402
from peft_suite.runner import run_suite  # noqa: E402

DEFAULT_JSON = Path(tempfile.gettempdir()) / "peft_conformance.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", default=",".join(cases.METHODS), help="comma-separated (default: %(default)s)"
    )
    parser.add_argument("-k", dest="k", default=None, help="extra pytest -k filter (the control follows)")
    parser.add_argument("--keep", action="store_true", help="keep the temp workspace (log, junit.xml)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="details (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="do not stream pytest's output")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run = run_suite(methods, k=args.k, keep=args.keep, json_path=args.json, echo=not args.quiet)
    print(run.markdown())
    print(f"\ndetails: {args.json}" + (f"; workspace: {run.meta['workspace']}" if args.keep else ""))
    return 1 if any(run.gaps(m) for m in methods) else 0


if __name__ == "__main__":
    sys.exit(main())
