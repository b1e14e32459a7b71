"""Peak host RSS of writing a 204-frame 544x992 video: streamed chunk by chunk vs whole.

    python benchmark/stream_rss.py [--mode stream|whole] [--frames 204]

The decoder is replaced by pieces of the sizes the VAE yields (16, 17, ..., 17, 18 frames of float32
(B, F, 3, H, W) in [-1, 1], made per piece), so this measures what the runner holds around the
decode: ``stream`` is ``StepVideoPipeline.write_stream`` (uint8 per piece into the H.264 writer),
``whole`` converts and writes the whole float video at once (the pre-streaming behaviour of a float
decode). Run each mode in its own process; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from stepvideo.diffusion.video_pipeline import StepVideoPipeline
from stepvideo.video_io import save_video, uint8_per_sample


def rss_gib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 2 ** 20


def float_pieces(frames: int, height: int, width: int):
    sizes = [16] + [17] * ((frames - 17) // 17) + [18] if frames > 17 else [frames]
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        yield torch.rand(1, n, 3, height, width, generator=g) * 2 - 1


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["stream", "whole"], default="stream")
    p.add_argument("--frames", type=int, default=204)
    p.add_argument("--height", type=int, default=544)
    p.add_argument("--width", type=int, default=992)
    a = p.parse_args(argv)
    base = rss_gib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        stem = os.path.join(tmp, "v")
        if a.mode == "stream":
            pipe = StepVideoPipeline(torch.nn.Linear(1, 1))
            pieces = (uint8_per_sample(x) for x in float_pieces(a.frames, a.height, a.width))
            pipe.write_stream(pieces, stem, a.frames)
        else:
            video = torch.cat(list(float_pieces(a.frames, a.height, a.width)), dim=1)
            save_video(video, stem + ".mp4")
        size = os.path.getsize(stem + ".mp4")
    print(json.dumps({"mode": a.mode, "frames": a.frames, "size": [a.height, a.width],
                      "rss_before_gib": round(base, 3), "peak_rss_gib": round(rss_gib("VmHWM"), 3),
                      "mp4_bytes": size}))


if __name__ == "__main__":
    main()
