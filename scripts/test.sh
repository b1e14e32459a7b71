#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: creates .venv if missing, installs torch
# (the CPU build first, so pip does not pull a multi-GB CUDA build), the package with its test
# extras and Debian's chromium for the gallery test when apt is available, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${STEPVIDEO_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --timeout 900 "$@"
