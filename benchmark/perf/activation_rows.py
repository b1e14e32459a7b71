"""Activation memory of the DiT and the VAE decoder, measured on the CPU with the live-tensor meter
(``stepvideo.memtrack``): the numbers behind the planner's ``ActivationModel``.

    python benchmark/perf/activation_rows.py [--out benchmark/results/cpu_activation_rows.json]

DiT: the released width (48 heads x 128 = 6144), random weights, a 2-block model, CFG batch 2,
16 text tokens, 256 and 512 video tokens per sample; one forward (embed -> blocks -> head) per
option: plain, ``--ff_chunk 64``, ``--cfg_sequential`` (``set_batch_chunk(1)``) and both, in
bfloat16 (what the GPU runs) and float32 (256 tokens). ``rows`` = peak bytes / (tokens x 6144 x
dtype bytes x batch); ``slope_rows`` is the same from the difference between the two token counts,
which cancels every term that does not grow with the video (text context, conditioning). Under
``--cfg_sequential`` ``held_rows`` = slope rows - the plain per-sample rows (what the waiting
sample holds). Depth: 1 block vs 2 blocks at 256 tokens (under no_grad nothing accumulates).

VAE: the released decoder (``vae.vae.PRESETS["base"]``), random weights, one chunk (3 latent
frames -> 17 frames): untiled at 2 x 2 and 4 x 4 latent pixels, and tiled (tile 2 on a 3 x 2
latent, tile 4 on a 6 x 4 latent: two tiles each); bytes per decoded pixel-frame of the decoded
area (the tile's, when tiled). Bigger tiles cost minutes on a 2-core CPU; the per-pixel figure is
the same at every size measured.

Parallel (each in its own ``torchrun`` of gloo processes on 127.0.0.1, the released width, 2 random
blocks, bf16, plain and ``--cfg_sequential``): tensor parallel 2 and 4, Ulysses 2 and 4, ring 2
and 4; rows per token of the rank (its share of the sequence) and sample, rank 0's peak.

These are the tensors the ops allocate, the same on every device; kernel workspaces and allocator
rounding come on top on a GPU (see stepvideo/memtrack.py). About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from stepvideo import synthetic
from stepvideo.memtrack import dit_peak_bytes, peak_live_bytes
from stepvideo.modules.model import PRESETS as DIT_PRESETS
from stepvideo.timing import device_name
from stepvideo.vae.vae import FRAMES_PER_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR
from stepvideo.vae.vae import PRESETS as VAE_PRESETS
from stepvideo.vae.vae import AutoencoderKL

BATCH, TEXT, CLIP = 2, 16, 4
GRIDS = ((4, 8, 8), (8, 8, 8))               # 256 and 512 tokens per sample, several frames
FF_CHUNK = 64
OPTIONS = {"plain": (0, 0), "ff_chunk": (FF_CHUNK, 0), "cfg_sequential": (0, 1),
           "both": (FF_CHUNK, 1)}
VAE_CASES = {"untiled_2x2": (2, 2, None), "untiled_4x4": (4, 4, None),
             "tile2_on_3x2": (3, 2, 2), "tile4_on_6x4": (6, 4, 4)}


def dit_rows(dtype: torch.dtype, grids, blocks: int) -> dict:
    cfg = dataclasses.replace(DIT_PRESETS["base"], num_layers=blocks)
    model = synthetic.random_model(cfg, torch.device("cpu"), dtype, seed=0)
    dim, elem = cfg.inner_dim, torch.empty((), dtype=dtype).element_size()
    out = {}
    for name, (ff_chunk, batch_chunk) in OPTIONS.items():
        model.set_ff_chunk(ff_chunk)
        model.set_batch_chunk(batch_chunk)
        points = {}
        for grid in grids:
            tokens = grid[0] * grid[1] * grid[2]
            inputs = synthetic.model_inputs(cfg, BATCH, grid, TEXT, CLIP, torch.device("cpu"), dtype,
                                            seed=1)
            start = time.perf_counter()
            peak = dit_peak_bytes(model, inputs)
            points[tokens] = {"peak_bytes": peak, "rows": peak / (tokens * dim * elem * BATCH),
                              "seconds": round(time.perf_counter() - start, 1)}
            print(f"{dtype} {name:15s} {tokens:4d} tokens: {peak / 2**20:8.1f} MiB = "
                  f"{points[tokens]['rows']:.2f} rows", flush=True)
        out[name] = {"points": points}
        if len(points) > 1:
            (s0, p0), (s1, p1) = list(points.items())[:2]
            out[name]["slope_rows"] = (p1["peak_bytes"] - p0["peak_bytes"]) / ((s1 - s0) * dim * elem
                                                                               * BATCH)
    if blocks > 1:
        model.set_ff_chunk(0)
        model.set_batch_chunk(0)
        inputs = synthetic.model_inputs(cfg, BATCH, grids[0], TEXT, CLIP, torch.device("cpu"), dtype,
                                        seed=1)
        out["depth"] = {n: dit_peak_bytes(model, inputs, blocks=n) for n in range(1, blocks + 1)}
        print(f"{dtype} depth: {out['depth']}", flush=True)
    return out


PARALLEL = (("tensor_parallel", 2), ("tensor_parallel", 4), ("ulysses", 2), ("ulysses", 4),
            ("ring", 2), ("ring", 4))


def parallel_worker(kind: str, out: str, grids, blocks: int = 2) -> None:
    """Under torchrun: the rows of a ``kind`` (tensor_parallel, ulysses, ring) run over the
    world's ranks, plain and with one sample in flight; rank 0 writes them to ``out`` (JSON)."""
    import torch.distributed as dist

    from stepvideo.parallel import ParallelConfig
    from stepvideo.parallel.torch_backend import Groups, UlyssesPlan, shard_blocks

    dist.init_process_group("gloo")
    degree, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16
    cfg = dataclasses.replace(DIT_PRESETS["base"], num_layers=blocks)
    model = synthetic.random_model(cfg, torch.device("cpu"), dtype, seed=0)
    if kind == "tensor_parallel":
        shard_blocks(model, rank, degree, dist.group.WORLD)
    else:
        model.plan = UlyssesPlan(Groups(ParallelConfig(**{f"{kind}_degree": degree}), rank))
    share = 1 if kind == "tensor_parallel" else degree  # tokens per rank = tokens / share
    dim, elem = cfg.inner_dim, torch.empty((), dtype=dtype).element_size()
    res = {"kind": kind, "degree": degree}
    for name, batch_chunk in (("plain", 0), ("cfg_sequential", 1)):
        model.set_batch_chunk(batch_chunk)
        points = {}
        for grid in grids:
            tokens = grid[0] * grid[1] * grid[2] // share
            inputs = synthetic.model_inputs(cfg, BATCH, grid, TEXT, CLIP, torch.device("cpu"), dtype,
                                            seed=1)
            # the smaller of two runs: a gloo work object may keep a collective's tensor (a
            # row-parallel output, one sample's row) for a moment after wait() returns, freed on
            # gloo's thread, so once in a while a peak holds one more row (seen under
            # --cfg_sequential with tensor parallelism)
            peak = min(dit_peak_bytes(model, inputs) for _ in range(2))
            points[tokens] = {"peak_bytes": peak, "rows": peak / (tokens * dim * elem * BATCH)}
        (s0, p0), (s1, p1) = list(points.items())[:2]
        res[name] = {"points": points, "slope_rows": (p1["peak_bytes"] - p0["peak_bytes"])
                     / ((s1 - s0) * dim * elem * BATCH)}
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def parallel_rows(kind: str, degree: int, grids=GRIDS, timeout: float = 900) -> dict:
    """Run ``parallel_worker`` in ``degree`` gloo processes (torchrun) and return rank 0's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        # --standalone: torchrun picks its own free rendezvous port (no pick-then-bind race)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(degree), os.path.abspath(__file__), "--worker", kind, "--worker_out", out,
               "--grids", ",".join("x".join(map(str, g)) for g in grids)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} {degree} failed:\n{proc.stderr[-3000:]}")
        with open(out, encoding="utf-8") as f:
            res = json.load(f)
    print(f"{kind} {degree}: plain {res['plain']['slope_rows']:.2f} rows, cfg_sequential "
          f"{res['cfg_sequential']['slope_rows']:.2f}", flush=True)
    return res


def held_rows(res: dict) -> dict:
    """Rows a waiting CFG sample holds under --cfg_sequential, per token of one sample: the
    sequential slope (both samples, per token-sample) x batch - the in-flight sample's rows."""
    if "slope_rows" not in res["plain"]:
        return {}
    per_sample = res["plain"]["slope_rows"]   # plain rows are per token-sample already
    return {"held_rows": res["cfg_sequential"]["slope_rows"] * BATCH - per_sample,
            "held_rows_with_ff_chunk": res["both"]["slope_rows"] * BATCH
            - res["ff_chunk"]["slope_rows"]}


def random_vae(dtype: torch.dtype) -> AutoencoderKL:
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(VAE_PRESETS["base"])
    vae = vae.to(dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0, 0.02,
                                                                                      generator=gen)
    return vae.eval()


def vae_peaks(dtype: torch.dtype, cases: dict) -> dict:
    vae = random_vae(dtype)
    z_ch = vae.config.z_channels
    gen = torch.Generator().manual_seed(2)
    out = {}
    for name, (h, w, tile) in cases.items():
        z = torch.randn(1, LATENTS_PER_CHUNK, z_ch, h, w, generator=gen).to(dtype)
        start = time.perf_counter()
        peak = peak_live_bytes(lambda: vae.decode_chunk(z, tile, 0 if tile else None))
        area = min(tile or h, h) * min(tile or w, w) * SPATIAL_FACTOR ** 2
        out[name] = {"latent_hw": [h, w], "tile": tile, "peak_bytes": peak,
                     "bytes_per_pixel_frame": peak / (area * FRAMES_PER_CHUNK),
                     "seconds": round(time.perf_counter() - start, 1)}
        print(f"{dtype} VAE {name:13s}: {peak / 2**20:7.1f} MiB = "
              f"{out[name]['bytes_per_pixel_frame']:.1f} B per decoded pixel-frame", flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON file")
    p.add_argument("--no_parallel", action="store_true", help="skip the torchrun measurements")
    p.add_argument("--worker", choices=("tensor_parallel", "ulysses", "ring"), help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    p.add_argument("--grids", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        grids = [tuple(int(n) for n in g.split("x")) for g in a.grids.split(",")]
        parallel_worker(a.worker, a.worker_out, grids)
        return {}
    torch.manual_seed(0)
    start = time.perf_counter()
    res = {"device": device_name(torch.device("cpu")), "torch": torch.__version__,
           "meter": "stepvideo.memtrack.peak_live_bytes (op-output storages; no kernel "
                    "workspaces, no allocator rounding)",
           "dit": {"dim": DIT_PRESETS["base"].inner_dim, "batch": BATCH, "text_tokens": TEXT,
                   "ff_chunk": FF_CHUNK}}
    bf16 = dit_rows(torch.bfloat16, GRIDS, blocks=2)
    res["dit"]["bfloat16"] = {**bf16, **held_rows(bf16)}
    res["dit"]["float32"] = dit_rows(torch.float32, GRIDS[:1], blocks=1)
    if not a.no_parallel:
        res["dit"]["parallel"] = [parallel_rows(kind, degree) for kind, degree in PARALLEL]
    res["vae"] = {"bfloat16": vae_peaks(torch.bfloat16, VAE_CASES),
                  "float32": vae_peaks(torch.float32, {"untiled_2x2": VAE_CASES["untiled_2x2"]})}
    res["seconds"] = round(time.perf_counter() - start, 1)
    table(res)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    return res


def table(res: dict) -> None:
    d = res["dit"]
    print(f"\nDiT rows of D = {d['dim']} per token-sample (batch {d['batch']}, CPU, {res['device']})")
    print(f"{'option':16s} {'bf16 256':>9s} {'bf16 512':>9s} {'bf16 slope':>11s} {'fp32 256':>9s}")
    for name in OPTIONS:
        b, f = d["bfloat16"][name], d["float32"][name]
        pts = list(b["points"].values())
        print(f"{name:16s} {pts[0]['rows']:9.2f} {pts[1]['rows']:9.2f} {b['slope_rows']:11.2f} "
              f"{list(f['points'].values())[0]['rows']:9.2f}")
    print(f"held rows (cfg_sequential, bf16): {d['bfloat16']['held_rows']:.2f}; depth peaks (bytes): "
          f"{d['bfloat16']['depth']}")
    for r in d.get("parallel", []):
        print(f"{r['kind']:16s} {r['degree']}: {r['plain']['slope_rows']:6.2f} rows per rank token-"
              f"sample, cfg_sequential {r['cfg_sequential']['slope_rows']:6.2f} (bf16 slope)")
    for dtype, cases in res["vae"].items():
        for name, c in cases.items():
            print(f"VAE {dtype} {name:13s} {c['peak_bytes'] / 2**20:8.1f} MiB "
                  f"{c['bytes_per_pixel_frame']:8.1f} B/pixel-frame")
    print(f"total {res['seconds']} s")


if __name__ == "__main__":
    main()
