"""Generate a video with Step-Video-T2V under torchrun.

    torchrun --nproc_per_node 4 run_parallel.py --model_dir stepvideo-t2v --ulysses_degree 4 \
        --vae_url 127.0.0.1:8080 --caption_url 127.0.0.1:8080 --prompt "..."

See ``python run_parallel.py --help`` for every flag.
"""

import sys

from stepvideo.runner import main

if __name__ == "__main__":
    sys.exit(main())
