"""The Video-VAE at full size on one GPU: untiled vs tiled, 1 vs 2 ranks, streamed output.

    python benchmark/gpu_vae.py                       # H200: full-size VAE, random weights, bf16
    python benchmark/gpu_vae.py --tiny --device cpu   # the same measurements at tiny size (tests)

For each size (544x992 and 768x768, 204 frames = 36 latent frames = 12 chunks):
1. one chunk untiled and at each --tiles edge: seconds, peak memory, and the tiled frames against
   the untiled ones (float max/mean abs, uint8 max/mean abs);
2. the whole video untiled and tiled at --tile (24): seconds and peak;
3. 2 ranks emulated as two sequential halves (chunks 0, 2, 4 ... then 1, 3, 5 ...) on this one
   GPU: the parallel wall time is the slower half (the gather of uint8 frames is not timed);
4. (first size only) the tiled video streamed into the H.264 writer as it is decoded: peak host RSS.
Random weights (seeded default init): the times and memory are the real model's, the tiled-vs-
untiled differences are not a quality measurement. Writes one JSON file; exits 1 when a tiled
decode peaks above --limit_gib or a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from stepvideo.timing import device_name, reset_peak_memory, sync
from stepvideo.vae.local import LocalVAE
from stepvideo.vae.vae import LATENTS_PER_CHUNK, AutoencoderKL, VAEConfig, decoded_frames
from stepvideo.video_io import VideoWriter, uint8_per_sample

FULL_SIZES = [(544, 992), (768, 768)]
TINY_SIZES = [(32, 48)]          # one size keeps the CPU test short


def rss_gib(field: str = "VmHWM") -> float:
    """This process's resident memory from /proc (VmRSS now, VmHWM its high-water mark)."""
    with open("/proc/self/status", encoding="ascii") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 2 ** 20


def reset_rss_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def timed(fn, device: torch.device):
    """(result, seconds, peak GiB) of one synchronised call."""
    reset_peak_memory(device)
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, peak_gib(device)


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    err = (a.float() - b.float()).abs()
    u8 = (uint8_per_sample(a.cpu()).int() - uint8_per_sample(b.cpu()).int()).abs()
    return {"float_max": err.max().item(), "float_mean": err.mean().item(),
            "uint8_max": u8.max().item(), "uint8_mean": u8.float().mean().item()}


def decode_chunks(vae: AutoencoderKL, z: torch.Tensor, indices, tile) -> None:
    """Decode the chunks ``indices`` of ``z`` one by one and keep nothing (a rank's share)."""
    chunks = z.split(LATENTS_PER_CHUNK, dim=1)
    for i in indices:
        vae.decode_chunk(chunks[i], tile)


def measure_size(vae, height, width, frames_latent, tiles, tile, device, stream: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, frames_latent, vae.config.z_channels, height // 16, width // 16, generator=g)
    z = z.to(device, vae.dtype)
    row = {"height": height, "width": width, "frames": decoded_frames(frames_latent),
           "latent": list(z.shape)}
    vae.decode_chunk(z[:, :LATENTS_PER_CHUNK], tile)  # warm-up (kernels, allocator)
    ref, s, p = timed(lambda: vae.decode_chunk(z[:, :LATENTS_PER_CHUNK]), device)
    row["chunk"] = {"untiled": {"seconds": s, "peak_gib": p}}
    for t in tiles:
        out, s, p = timed(lambda: vae.decode_chunk(z[:, :LATENTS_PER_CHUNK], t), device)
        row["chunk"][f"tile{t}"] = {"seconds": s, "peak_gib": p, "overlap": max(t // 4, 1),
                                    **diff(out, ref)}
        del out
    del ref
    n = len(z.split(LATENTS_PER_CHUNK, dim=1))
    _, s, p = timed(lambda: decode_chunks(vae, z, range(n), None), device)
    row["video_untiled"] = {"seconds": s, "peak_gib": p}
    halves = []
    for r in range(2):
        _, s, p = timed(lambda: decode_chunks(vae, z, range(r, n, 2), tile), device)
        halves.append({"seconds": s, "peak_gib": p})
    row["video_tiled"] = {"tile": tile, "seconds": sum(h["seconds"] for h in halves),
                          "peak_gib": max((h["peak_gib"] or 0) for h in halves) or None}
    row["two_ranks_emulated"] = {"note": "one GPU: the two ranks' shares run one after the other",
                                 "rank_seconds": [h["seconds"] for h in halves],
                                 "wall_seconds": max(h["seconds"] for h in halves)}
    if stream:
        before, reset = rss_gib("VmRSS"), reset_rss_high_water()
        local = LocalVAE(vae, tile=tile)
        with tempfile.TemporaryDirectory() as tmp:
            def write():
                with VideoWriter(os.path.join(tmp, "v.mp4")) as w:
                    for piece in local.iter_uint8(z):
                        w.write(piece)
                return w.frames
            frames, s, p = timed(write, device)
        row["streamed_to_mp4"] = {"frames": frames, "seconds": s, "peak_gib": p,
                                  "host_rss_gib_before": before,
                                  "host_rss_high_water_gib": rss_gib(),
                                  "high_water_reset_before": reset}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny VAE at small sizes (CPU tests)")
    p.add_argument("--tiles", default=None, help="comma-separated tile edges (latent px)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile of the whole-video runs (default 24; tiny: the first of --tiles)")
    p.add_argument("--latent_frames", type=int, default=36, help="36 = 204 frames")
    p.add_argument("--limit_gib", type=float, default=12.0, help="tiled peak target per GPU")
    p.add_argument("--out", default="benchmark/results/gpu_vae.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    tiles = [int(t) for t in (a.tiles or ("2" if a.tiny else "32,24,16")).split(",")]
    tile = a.tile or (tiles[0] if a.tiny else 24)
    cfg = VAEConfig.tiny() if a.tiny else VAEConfig()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL.from_config(cfg).to(dtype).eval().requires_grad_(False)
    result = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "config": "tiny" if a.tiny else "full (random weights)", "torch": torch.__version__,
              "params": sum(t.numel() for t in vae.parameters()), "limit_gib": a.limit_gib,
              "sizes": [], "errors": []}
    for i, (h, w) in enumerate(TINY_SIZES if a.tiny else FULL_SIZES):
        try:
            with torch.inference_mode():
                row = measure_size(vae, h, w, a.latent_frames, tiles, tile, device, stream=i == 0)
            result["sizes"].append(row)
            print(json.dumps(row), flush=True)
        except Exception as e:  # report, go on with the next size
            result["errors"].append(f"{h}x{w}: {type(e).__name__}: {e}")
            print(result["errors"][-1], file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    over = [f"{r['height']}x{r['width']} tile {tile}: {r['video_tiled']['peak_gib']:.1f} GiB"
            for r in result["sizes"] if (r["video_tiled"]["peak_gib"] or 0) > a.limit_gib]
    result["over_limit"] = over
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}; over the {a.limit_gib} GiB limit: {over or 'none'}; "
          f"errors: {result['errors'] or 'none'}")
    return 1 if over or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
