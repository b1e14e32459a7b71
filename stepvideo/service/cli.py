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

from .guard import ConnectionLimits
from .protocol import (DEFAULT_PORT, MAX_LATENT_ELEMENTS, MAX_VIDEO_AREA, MAX_VIDEO_FRAMES,
                       MAX_VIDEO_SIDE, TOKEN_ENV)
from .server import (DEFAULT_HOST, DEFAULT_MAX_BODY, DEFAULT_MAX_WAIT, DEFAULT_THREADS,
                     ServerOptions, ServiceConfigError, run_server)
from ..devices import DTYPE_CHOICES
from ..vae.local import parse_tile
from ..weights import CheckpointError
from ..layout import HUNYUAN_CLIP, STEP_LLM, VAE


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
    p.add_argument("--llm_dir", default=STEP_LLM.folder,
                   help="Step-1 LLM dir, relative to --model_dir or absolute")
    p.add_argument("--clip_dir", default=HUNYUAN_CLIP.folder,
                   help="HunyuanCLIP dir, relative to --model_dir or absolute")
    p.add_argument("--vae_dir", default=VAE.folder,
                   help=f"VAE dir (holds {VAE.single}), relative to --model_dir or absolute")
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
    cost = p.add_argument_group("cost of one /vae-api request (422 above; shown in /info)")
    cost.add_argument("--max_video_frames", type=int, default=MAX_VIDEO_FRAMES,
                      help="frames of the decoded video (17 per 3 latent frames)")
    cost.add_argument("--max_video_side", type=int, default=MAX_VIDEO_SIDE,
                      help="pixels on either side of a decoded frame (16 per latent pixel)")
    cost.add_argument("--max_video_area", type=int, default=MAX_VIDEO_AREA,
                      help="pixels per decoded frame (1280x720; 544x992 fits)")
    cost.add_argument("--max_wait", type=float, default=DEFAULT_MAX_WAIT,
                      help="seconds a request may wait in its model's first-come-first-served "
                           "line before a retryable 503")
    d = ConnectionLimits()
    sock = p.add_argument_group("connections (slow or hostile clients; shown in /info)")
    sock.add_argument("--max_connections", type=int, default=d.max_connections,
                      help="open connections in all")
    sock.add_argument("--max_connections_per_ip", type=int, default=d.max_connections_per_ip,
                      help="open connections per client address (0: no per-address budget; "
                           "behind a reverse proxy every client has the proxy's address)")
    sock.add_argument("--header_timeout", type=float, default=d.header_timeout,
                      help="seconds from a request's first byte to the end of its headers")
    sock.add_argument("--request_timeout", type=float, default=d.request_timeout,
                      help="seconds from a request's first byte to the end of its body")
    sock.add_argument("--send_timeout", type=float, default=d.send_timeout,
                      help="seconds an answer may go unread before the connection is closed")
    sock.add_argument("--idle_timeout", type=float, default=d.idle_timeout,
                      help="seconds an idle keep-alive connection stays open")
    sock.add_argument("--max_unsent_mb", type=float, default=d.max_unsent / (1 << 20),
                      help="MiB of an answer buffered before its worker waits for the client")
    p.add_argument("--vae_tile", default="auto",
                   help="spatial tiles of the VAE decode: auto (only when an untiled 17-frame chunk "
                        "would not fit the free memory), off, or N = tile edge in latent pixels")
    p.add_argument("--devices", default="",
                   help="comma-separated devices for the VAE (e.g. cuda:0,cuda:1): a replica on "
                        "each decodes its share of the chunks at once, with the frames of one device; the "
                        "first also holds the caption models (it replaces --device)")
    a = p.parse_args(argv)
    try:
        connections = ConnectionLimits(
            a.max_connections, a.max_connections_per_ip, a.header_timeout, a.request_timeout,
            a.send_timeout, a.idle_timeout, int(a.max_unsent_mb * (1 << 20)))
    except ValueError as e:
        p.error(str(e))
    if not a.max_wait > 0:
        p.error(f"--max_wait must be > 0, got {a.max_wait}")
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
                         max_video_frames=a.max_video_frames, max_video_side=a.max_video_side,
                         max_video_area=a.max_video_area, max_wait=a.max_wait,
                         connections=connections, vae_tile=a.vae_tile, devices=devices)


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
