"""Command line of the caption/VAE service (``stepvideo-server``, ``api/call_remote_server.py``).

    stepvideo-server --model_dir /path/stepvideo-t2v [--port 8080] [--host ADDR]

The DiT ranks then call it with ``pipeline.setup_api(vae_url, caption_url)``. The DiT weights are
not needed here. See stepvideo/service/server.py for the endpoints and stepvideo/service/protocol.py
for the wire format.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .protocol import DEFAULT_PORT, MAX_LATENT_ELEMENTS, TOKEN_ENV
from .server import (DEFAULT_HOST, DEFAULT_MAX_BODY, DEFAULT_THREADS,
                     ServerOptions, ServiceConfigError, run_server)
from ..devices import DTYPE_CHOICES
from ..vae.local import parse_tile
from ..weights import CheckpointError


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    p = argparse.ArgumentParser(
        prog="stepvideo-server",
        description="Caption (Step-1 LLM + HunyuanCLIP) and Video-VAE service for Step-Video-T2V. "
                    "POST /caption-api, POST /vae-api, GET /health, GET /info. Listens on "
                    "127.0.0.1 unless --host says otherwise; any other address needs a token.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", required=True,
                   help="downloaded stepvideo-t2v directory (python -m stepvideo.download DIR), or "
                        "a tiny one (python -m stepvideo.tiny DIR)")
    p.add_argument("--llm_dir", default="step_llm", help="Step-1 LLM dir, relative to --model_dir "
                                                          "or absolute")
    p.add_argument("--clip_dir", default="hunyuan_clip", help="HunyuanCLIP dir, relative to "
                                                                "--model_dir or absolute")
    p.add_argument("--vae_dir", default="vae", help="VAE dir (holds vae_v2.safetensors), relative "
                                                    "to --model_dir or absolute")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind; anything but loopback requires --token")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to bind")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if present), cpu, "
                                                    "cuda, cuda:N")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES,
                   help="LLM and VAE dtype, and the dtype embeddings are sent in (CLIP runs in "
                        "float32); auto = bfloat16 on CUDA, float32 on CPU")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token_file", default=None,
                       help=f"file holding the bearer token required on every request but "
                            f"/health (default: ${TOKEN_ENV}); a token is mandatory when --host "
                            f"is not loopback")
    token.add_argument("--token", default=None,
                       help=f"the token itself (visible to anyone who can run ps: prefer "
                            f"${TOKEN_ENV} or --token_file)")
    p.add_argument("--max_body_mb", type=float, default=DEFAULT_MAX_BODY / (1 << 20),
                   help="largest request body accepted (413 above it)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="waitress worker threads")
    p.add_argument("--cache_size", type=int, default=64,
                   help="prompts whose embeddings are cached (LRU; the negative prompt repeats)")
    p.add_argument("--max_latent_elements", type=int, default=MAX_LATENT_ELEMENTS,
                   help="largest latent tensor (all dims multiplied) one /vae-api request may "
                        "send (422 above it); a 204x544x992 video is 4.86 M")
    p.add_argument("--vae_tile", default="auto",
                   help="spatial tiles of the VAE decode: auto (only when an untiled 17-frame chunk "
                        "would not fit the free memory), off, or N = tile edge in latent pixels")
    p.add_argument("--devices", default="",
                   help="comma-separated devices for the VAE (e.g. cuda:0,cuda:1): a replica on "
                        "each decodes its share of the chunks at once, with the frames of one device; the "
                        "first also holds the caption models (it replaces --device)")
    a = p.parse_args(argv)
    try:
        parse_tile(a.vae_tile)
    except ValueError as e:
        p.error(str(e))
    devices = tuple(d.strip() for d in a.devices.split(",") if d.strip())
    if devices:
        a.device = devices[0]
    if a.token:
        print(f"warning: --token on the command line is visible to other users (ps, "
              f"/proc/PID/cmdline); set {TOKEN_ENV} or use --token_file instead", file=sys.stderr)
    return ServerOptions(model_dir=a.model_dir, llm_dir=a.llm_dir, clip_dir=a.clip_dir,
                         vae_dir=a.vae_dir, host=a.host, port=a.port, device=a.device,
                         dtype=a.dtype, token=a.token, token_file=a.token_file,
                         max_body=int(a.max_body_mb * (1 << 20)), threads=a.threads,
                         cache_size=a.cache_size, max_latent_elements=a.max_latent_elements,
                         vae_tile=a.vae_tile, devices=devices)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run_server(opts)
    except (ServiceConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
