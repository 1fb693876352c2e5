"""Run in a FRESH interpreter by the conformance battery: reload saved adapters and write their logits.

usage: python reload_check.py OUT.safetensors MODEL_CASE=ADAPTER_DIR [...]
"""

from __future__ import annotations

import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from tiny_models import MODEL_CASES, logits

import ortho_adapters  # noqa: F401  (registers the PEFT types)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # the parent computes its reference logits with one thread too
    out_path, pairs = argv[0], argv[1:]
    results = {}
    for pair in pairs:
        case_name, adapter_dir = pair.split("=", 1)
        case = MODEL_CASES[case_name]
        model = PeftModel.from_pretrained(case.model(), adapter_dir).eval()
        with torch.no_grad():
            results[case_name] = logits(model, case.inputs()).contiguous()
    save_file(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
