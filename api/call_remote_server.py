"""Serve the Step-Video text encoders (Step-1 LLM + HunyuanCLIP) and the Video-VAE over HTTP.

    python api/call_remote_server.py --model_dir /path/stepvideo-t2v [--port 8080] [--host ADDR]

The same command is installed as ``stepvideo-server``. The flags and the server live in
``stepvideo/service/cli.py`` and ``stepvideo/service/server.py``.
"""

import sys

from stepvideo.service.cli import main, parse_args  # noqa: F401 - parse_args for callers of this script

if __name__ == "__main__":
    sys.exit(main())
