"""Tiled vs untiled VAE decoding on the CPU: error and peak live memory per tile size.

    python benchmark/perf/vae_tiles.py [--size 12] [--tiles 8:2,6:2,4:1] [--out FILE]

The conformance kit's small VAE (random weights, fp32), one chunk (3 latent frames) of size x size
latent pixels. Peak memory is the profiler's live CPU tensor bytes (as in tests/test_vae.py); the
error is against the untiled decode, in float and in uint8 frames. Random weights: the numbers bound
the blend, they do not measure quality on the released weights.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from stepvideo.conformance import load_json, load_tensors
from stepvideo.vae.vae import AutoencoderKL, VAEConfig
from stepvideo.video_io import uint8_per_sample
from stepvideo.weights import load_state_dict_strict


def kit_vae() -> AutoencoderKL:
    kit = load_json("vae_small.json")
    w = kit["inner_widths"]
    cfg = VAEConfig(**kit["constructor_args"], encoder_ch=w["VideoEncoder"]["ch"],
                    encoder_ch_mult=w["VideoEncoder"]["ch_mult"], decoder_ch=w["VideoDecoder"]["ch"],
                    decoder_ch_mult=w["VideoDecoder"]["ch_mult"])
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg)
    load_state_dict_strict(vae, load_tensors(kit["weights"]["file"], torch.float32))
    return vae.eval()


def peak_mib(fn) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2 ** 20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=12)
    p.add_argument("--tiles", default="8:2,6:2,4:1", help="tile:overlap pairs, latent pixels")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    vae = kit_vae()
    z = torch.randn(1, 3, vae.config.z_channels, a.size, a.size,
                    generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    ref = vae.decode(z)
    res = {"latent": list(z.shape), "untiled": {"seconds": time.perf_counter() - start,
                                                "peak_mib": peak_mib(lambda: vae.decode(z))}}
    for pair in a.tiles.split(","):
        tile, overlap = map(int, pair.split(":"))
        start = time.perf_counter()
        out = vae.decode(z, tile_size=tile, tile_overlap=overlap)
        seconds = time.perf_counter() - start
        err = (out - ref).abs()
        u8 = (uint8_per_sample(out).int() - uint8_per_sample(ref).int()).abs()
        res[f"tile{tile}_overlap{overlap}"] = {
            "float_max": err.max().item(), "float_mean": err.mean().item(),
            "uint8_max": u8.max().item(), "uint8_mean": u8.float().mean().item(),
            "seconds": seconds,
            "peak_mib": peak_mib(lambda: vae.decode(z, tile_size=tile, tile_overlap=overlap))}
        print(json.dumps({pair: res[f"tile{tile}_overlap{overlap}"]}), flush=True)
    res["ref_abs_max"] = ref.abs().max().item()
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
