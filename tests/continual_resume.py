"""Run in a FRESH interpreter by test_continual: reload an adapter saved after task 2, train task 3, save.

usage: python continual_resume.py ADAPTER_DIR OUT_DIR MODE
"""

from __future__ import annotations

import sys

from continual_helpers import base_model, run_task
from peft import PeftModel

import ortho_adapters  # noqa: F401  (registers the PEFT types)


def main(adapter_dir: str, out_dir: str, mode: str) -> None:
    model = PeftModel.from_pretrained(base_model(), adapter_dir, is_trainable=True)
    run_task(model, "t3", 3, mode)
    model.save_pretrained(out_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
