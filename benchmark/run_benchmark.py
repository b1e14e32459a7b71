"""Run a prompt suite through Step-Video-T2V under torchrun, resumably, and write a gallery.

    python api/call_remote_server.py --model_dir stepvideo-t2v &
    torchrun --nproc_per_node 4 benchmark/run_benchmark.py --model_dir stepvideo-t2v \
        --ulysses_degree 4 --suite step-video-t2v-eval --lines 1-12 --save_path results/eval

Same model, parallel and sampling flags as run_parallel.py (no --prompt); see --help. Per prompt
it writes SAVE_PATH/NNNN-category/<name>.mp4 + .json sidecar + .png contact sheet, and
SAVE_PATH/manifest.jsonl, summary.json and index.html (benchmark/report.py). Rerun the same
command to finish an interrupted run: complete prompts are skipped, broken ones redone.
The job itself is stepvideo.suite_runner (also installed as stepvideo-benchmark); the suites and
manifest are stepvideo.suite, the gallery stepvideo.gallery.
"""

import sys

from stepvideo.suite_runner import main

if __name__ == "__main__":
    sys.exit(main())
