#!/usr/bin/env bash
# Install rlhfc into a venv (default .venv): CPU torch first where no GPU is present,
# so pip does not pull a multi-GB CUDA build; GPU machines keep or get a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLHFC_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[test]"
