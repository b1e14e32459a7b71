"""Wire-format benchmark: the service's safetensors messages vs pickle at real payload sizes.

    python benchmark/perf/wire_format.py [--repeats 3] [--skip-float32]

For each payload it prints the bytes on the wire and the encode + decode time (best of
--repeats, one warm-up excluded) of our format (:mod:`stepvideo.service.protocol`, what the server
and client run) and of ``pickle`` (what the public release sends), and their ratios.

Payloads: the caption answer y (2, 320, 6144) bf16 (+ its mask and the CLIP embedding), the VAE
request latents (1, 36, 64, 34, 62) bf16, and the VAE answer for 204 frames at 544x992 as uint8
frames (B, F, H, W, 3), as bf16 float frames (the server's dtype) and as float32 frames.

pickle appears here only as the baseline: the package never unpickles anything.
"""

from __future__ import annotations

import argparse
import pickle  # the baseline being measured; never used by the package
import platform
import time
from typing import Callable

import torch

from stepvideo.service.protocol import (CaptionResponse, VAERequest, VAEResponse)


def payloads(skip_float32: bool) -> dict[str, tuple[Callable[[], bytes], Callable[[bytes], object],
                                                      dict]]:
    """name -> (encode with our format, decode with our format, the tensors for pickle)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, 320, 6144, generator=gen).to(torch.bfloat16)
    mask = torch.ones(2, 397, dtype=torch.long)
    clip = torch.randn(2, 77, 1024, generator=gen).to(torch.bfloat16)
    latents = torch.randn(1, 36, 64, 34, 62, generator=gen).to(torch.bfloat16)
    video_u8 = torch.randint(0, 256, (1, 204, 544, 992, 3), dtype=torch.uint8, generator=gen)
    video_bf16 = (video_u8.permute(0, 1, 4, 2, 3).to(torch.bfloat16) / 127.5 - 1).contiguous()
    out = {
        "caption y+mask+clip (2x320x6144 bf16)": (
            lambda: CaptionResponse(y, mask, clip).to_bytes(), CaptionResponse.from_bytes,
            {"y": y, "y_mask": mask, "clip_embedding": clip}),
        "vae latents (1x36x64x34x62 bf16)": (
            lambda: VAERequest(latents).to_bytes(), VAERequest.from_bytes, {"latents": latents}),
        "video uint8 (204x544x992x3)": (
            lambda: VAEResponse(video_u8, "uint8").to_bytes(), VAEResponse.from_bytes,
            {"video": video_u8}),
        "video bf16 (204x3x544x992)": (
            lambda: VAEResponse(video_bf16).to_bytes(), VAEResponse.from_bytes,
            {"video": video_bf16}),
    }
    if not skip_float32:
        video_f32 = video_bf16.float()
        out["video float32 (204x3x544x992)"] = (
            lambda: VAEResponse(video_f32).to_bytes(), VAEResponse.from_bytes, {"video": video_f32})
    return out


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(encode, decode, tensors, repeats: int) -> dict[str, float]:
    ours = encode()
    theirs = pickle.dumps(tensors, protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "ours_bytes": len(ours), "pickle_bytes": len(theirs),
        "ours_s": best_time(lambda: decode(encode()), repeats),
        "pickle_s": best_time(lambda: pickle.loads(pickle.dumps(
            tensors, protocol=pickle.HIGHEST_PROTOCOL)), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-float32", action="store_true",
                        help="skip the 1.3 GB float32 video (needs ~6 GB of RAM)")
    args = parser.parse_args()
    print(f"device: CPU {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = (f"{'payload':40s} {'ours MB':>9s} {'pickle MB':>10s} {'bytes x':>8s} "
              f"{'ours s':>8s} {'pickle s':>9s} {'time x':>7s}")
    print(header)
    print("-" * len(header))
    for name, (encode, decode, tensors) in payloads(args.skip_float32).items():
        m = measure(encode, decode, tensors, args.repeats)
        print(f"{name:40s} {m['ours_bytes'] / 1e6:9.2f} {m['pickle_bytes'] / 1e6:10.2f} "
              f"{m['ours_bytes'] / m['pickle_bytes']:8.4f} {m['ours_s']:8.3f} "
              f"{m['pickle_s']:9.3f} {m['ours_s'] / m['pickle_s']:7.2f}")
    print("bytes x, time x: ours / pickle (encode + decode, best of "
          f"{args.repeats} after one warm-up). uint8 frames are 1/2 of bf16 and 1/4 of float32.")


if __name__ == "__main__":
    main()
