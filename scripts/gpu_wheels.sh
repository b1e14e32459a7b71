#!/usr/bin/env bash
# Download the wheels benchmark/gpu_speed.py needs on the H200 image (Python 3.12, torch 2.11+cu130,
# no package registry there) into .whl/ (git-ignored), to be carried with the device call:
#   bash scripts/gpu_wheels.sh
#   (device) python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#              && export PYTHONPATH=/tmp/site:$PWD && python3 benchmark/gpu_speed.py --json $OUT/h200_speed.json
# torchao 0.18 loads its C++ extensions only with torch >= 2.11 (the image has 2.11.0); its float8 path
# itself is Python over torch._scaled_mm. sageattention 1.0.6 is pure Python + Triton (no dependencies).
# flash-attn-4 is left out: its nvidia-cutlass-dsl-libs-cu13 runtime is a 92 MB wheel, over the 64 MiB
# a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl torchao==0.18.0 sageattention==1.0.6
ls -la .whl
