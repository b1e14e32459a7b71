#!/usr/bin/env bash
# One command, fresh machine -> a video from the tiny default model, end to end:
# .venv + install, tiny model in the official layout, the caption/VAE service on 127.0.0.1,
# torchrun with 2 CPU ranks (Ulysses), then the paths of the mp4, its JSON sidecar and contact sheet.
#
# Environment overrides: DEMO_DIR (default ./outputs/demo), DEMO_PORT (8765), DEMO_PROMPT, DEMO_SEED,
# DEMO_STEPS (8), DEMO_NPROC (2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEMO_DIR=${DEMO_DIR:-outputs/demo}
PORT=${DEMO_PORT:-8765}
PROMPT=${DEMO_PROMPT:-"A red fox trots across a snowy field at sunrise / 一只红狐狸在日出时穿过雪原"}
SEED=${DEMO_SEED:-42}
STEPS=${DEMO_STEPS:-8}
NPROC=${DEMO_NPROC:-2}

if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${STEPVIDEO_TORCH_VERSION:-2.13.0}"
.venv/bin/python -c "import stepvideo, waitress" 2>/dev/null || .venv/bin/python -m pip install -q -e .

MODEL="$DEMO_DIR/tiny-model"
[ -f "$MODEL/model_index.json" ] || .venv/bin/python -m stepvideo.tiny "$MODEL"

LOG="$DEMO_DIR/service.log"
.venv/bin/python api/call_remote_server.py --model_dir "$MODEL" --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if .venv/bin/python - "$PORT" <<'PYEOF' 2>/dev/null; then break; fi
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2) as r:
    sys.exit(0 if json.load(r).get("status") == "ready" else 1)
PYEOF
  kill -0 $SERVER 2>/dev/null || { echo "the service exited; see $LOG" >&2; cat "$LOG" >&2; exit 1; }
  sleep 0.5
done

OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc_per_node "$NPROC" \
  --master_addr 127.0.0.1 --master_port "$((PORT + 1))" run_parallel.py \
  --model_dir "$MODEL" --vae_url "127.0.0.1:$PORT" --caption_url "127.0.0.1:$PORT" \
  --ulysses_degree "$NPROC" --device cpu --prompt "$PROMPT" --seed "$SEED" \
  --num_frames 17 --height 128 --width 128 --infer_steps "$STEPS" --save_path "$DEMO_DIR/videos"
