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
# Debian's Chromium renders the benchmark gallery in a test (skipped, with the reason, without it).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk) \
    >/dev/null 2>&1 || echo "note: could not install chromium; the gallery test will be skipped" >&2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --timeout 900 "$@"
