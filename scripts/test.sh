#!/usr/bin/env bash
# The README's test command: install (scripts/setup.sh) with the vLLM engine, so CI tests
# that path too (RLHFC_WITH_VLLM=0 leaves it out, and its tests then skip), then run the
# whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
RLHFC_WITH_VLLM=${RLHFC_WITH_VLLM:-1} bash scripts/setup.sh
. "${RLHFC_VENV:-.venv}/bin/activate"
if command -v npm >/dev/null 2>&1 && [ -f editors/vscode/package.json ]; then
  (cd editors/vscode && npm install --silent --no-audit --no-fund >/dev/null 2>&1) \
    || echo "note: npm install in editors/vscode failed; the TextMate tests will say why"
fi
python -m pytest -n 2 --dist loadfile "$@"
