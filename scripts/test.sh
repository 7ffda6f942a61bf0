#!/usr/bin/env bash
# The README's test command: make a venv, install (CPU torch first where no GPU), run the suite.
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
if command -v npm >/dev/null 2>&1; then
  (cd editors/vscode && npm install --silent --no-audit --no-fund >/dev/null 2>&1) || echo "note: npm install failed; TextMate tests will say why"
fi
python -m pytest -n 2 --dist loadfile "$@"
