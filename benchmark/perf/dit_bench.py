"""DiT forward benchmark: time, peak memory and achieved TFLOP/s, projected to the real jobs.

Cases (random weights, no checkpoint needed):
  small  the conformance kit's small DiT at the kit's input shapes (skipped if the kit is absent)
  block  one full-width block (48 heads x 128 = 6144) of a ``DiTConfig(num_layers=1)`` model at
         --tokens video tokens per sample, --batch samples, --text-len context tokens
  model  with --layers N: a whole N-layer model forward at the same shapes

    python benchmark/perf/dit_bench.py                                  # CPU, fp32, 256 tokens
    python benchmark/perf/dit_bench.py --device cuda --dtype bfloat16 --tokens 75888 --batch 2

Needs only torch and this package. The projection multiplies the measured per-device rate of the
``block`` case out to 50 steps x CFG batch 2 x 48 layers on 1/4/8 devices, ignoring communication;
it is meaningful when --tokens is near the job's token count (attention is quadratic in it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from stepvideo import flops
from stepvideo.conformance import kit_dir
from stepvideo.modules import attention
from stepvideo.modules.model import DiTConfig
from stepvideo.modules.rope import rope_tables
from stepvideo.synthetic import PUBLISHED_JOBS, latent_grid, model_inputs, random_model, token_grid
from stepvideo.timing import device_name, peak_memory_gb, reset_peak_memory, time_call

JOB_STEPS, JOB_BATCH, JOB_GPUS = 50, 2, (1, 4, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- attention ------------------------------------------------------------------------------

def resolved_attention(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel the attention seam runs for this device and dtype (head dim 128), as PyTorch's
    dispatcher reports it."""
    return attention.probe_kernel(device, dtype)


# --- cases ----------------------------------------------------------------------------------

def run_case(name: str, fn, flop_count: int, shape: dict, args, device) -> dict:
    reset_peak_memory(device)
    times = time_call(fn, device, args.warmup, args.repeats)
    median = statistics.median(times)
    tflops = flop_count / median / 1e12
    peak = flops.device_peak(device_name(device)) if device.type == "cuda" else None
    mem_kind, mem_gb = peak_memory_gb(device)
    result = {"case": name, **shape, "flops": flop_count, "times_s": times, "median_s": median,
              "tflops": tflops, "peak_bf16_tflops": peak,
              "fraction_of_peak": tflops / peak if peak else None,
              "memory_kind": mem_kind, "peak_memory_gb": mem_gb}
    frac = f", {100 * tflops / peak:.1f}% of {peak:g} TF bf16 peak" if peak else ""
    print(f"{name:>6}: median {median * 1e3:9.2f} ms over {len(times)} | "
          f"{flop_count / 1e9:12.2f} GFLOP | {tflops:8.3f} TFLOP/s{frac} | "
          f"{mem_kind} {mem_gb:.2f} GiB", flush=True)
    return result


def kit_small_case(args, device, dtype) -> dict | None:
    try:
        kit = kit_dir()
    except FileNotFoundError as e:
        print(f" small: skipped ({e})")
        return None
    if not (kit / "dit_small.json").is_file() or not (kit / "dit_small_io.safetensors").is_file():
        print(f" small: skipped (no dit_small.json/_io.safetensors in {kit})")
        return None
    from safetensors.torch import load_file

    cfg = DiTConfig.from_dict(json.loads((kit / "dit_small.json").read_text())["config"])
    io = load_file(str(kit / "dit_small_io.safetensors"))
    keys = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_2",
            "encoder_attention_mask")
    inputs = {k: io[k].to(device=device, dtype=dtype if io[k].is_floating_point() else None)
              for k in keys}
    inputs["encoder_attention_mask"] = io["encoder_attention_mask"].to(device)
    model = random_model(cfg, device, dtype)
    b, f, _, h, w = inputs["hidden_states"].shape
    text_len = inputs["encoder_attention_mask"].shape[1]
    clip_len = inputs["encoder_hidden_states_2"].shape[1]
    kv_len = int(inputs["encoder_attention_mask"].sum(-1).max())
    count = flops.dit_forward_flops(cfg, b, f * h * w, text_len, clip_len=clip_len, kv_len=kv_len)
    shape = {"layers": cfg.num_layers, "dim": cfg.inner_dim, "batch": b, "tokens": f * h * w,
             "text_len": text_len}
    return run_case("small", lambda: model(**inputs), count, shape, args, device)


def block_case(args, device, dtype) -> dict:
    cfg = DiTConfig(num_layers=1)
    model = random_model(cfg, device, dtype)
    if args.compile:
        model.compile_blocks()
    block, d = model.transformer_blocks[0], cfg.inner_dim
    grid = token_grid(args.tokens)
    x = torch.randn(args.batch, args.tokens, d, device=device, dtype=dtype)  # (B, N, D)
    context = torch.randn(args.batch, args.text_len, d, device=device, dtype=dtype)  # (B, L, D)
    t_mod = torch.randn(args.batch, 6 * d, device=device, dtype=dtype) * 0.02
    kv_lens = torch.full((args.batch,), args.text_len, device=device)  # masked path, all valid
    rope = rope_tables(*grid, cfg.attention_head_dim, device=device)
    count = flops.block_flops(cfg, args.batch, args.tokens, args.text_len)
    shape = {"layers": 1, "dim": d, "batch": args.batch, "tokens": args.tokens,
             "grid": list(grid), "text_len": args.text_len}
    result = run_case("block", lambda: block(x, context, t_mod, rope, kv_lens, model.plan, args.tokens),
                      count, shape, args, device)
    return result


def model_case(args, device, dtype) -> dict:
    cfg = DiTConfig(num_layers=args.layers)
    model = random_model(cfg, device, dtype)
    if args.compile:
        model.compile_blocks()
    grid = token_grid(args.tokens)
    inputs = model_inputs(cfg, args.batch, grid, args.text_len, 77, device, dtype)
    count = flops.dit_forward_flops(cfg, args.batch, args.tokens, args.text_len)
    shape = {"layers": args.layers, "dim": cfg.inner_dim, "batch": args.batch,
             "tokens": args.tokens, "grid": list(grid), "text_len": args.text_len}
    result = run_case("model", lambda: model(**inputs), count, shape, args, device)
    return result


# --- projection -----------------------------------------------------------------------------

def project_jobs(rate_tflops: float, peak_tflops: float | None, text_len: int) -> list[dict]:
    """50 steps x CFG batch 2 x 48 layers at ``rate_tflops`` per device, no communication."""
    cfg = DiTConfig()
    rows = []
    for job, (frames, height, width, published) in PUBLISHED_JOBS.items():
        f, h, w = latent_grid(frames, height, width)
        total = JOB_STEPS * flops.dit_forward_flops(cfg, JOB_BATCH, f * h * w, text_len)
        rows.append({
            "job": job, "tokens": f * h * w, "total_flops": total, "published_s_4gpu": published,
            "projected_s": {n: total / (rate_tflops * 1e12 * n) for n in JOB_GPUS},
            "ideal_at_peak_s": ({n: total / (peak_tflops * 1e12 * n) for n in JOB_GPUS}
                                if peak_tflops else None),
        })
    return rows


def print_projection(rows: list[dict], rate: float, peak: float | None, peak_label: str) -> None:
    print(f"\nProjection: {JOB_STEPS} steps x CFG batch {JOB_BATCH} x 48 layers at the measured "
          f"{rate:.3f} TFLOP/s per device (no communication); published = release README, 4 GPUs")
    gpus = " ".join(f"{f'{n} dev':>12}" for n in JOB_GPUS)
    print(f"{'job':>12} {'tokens':>7} {'PFLOP':>8} | {gpus} | {'published':>9} | "
          f"ideal @ {peak_label}")
    for r in rows:
        proj = " ".join(f"{r['projected_s'][n]:11.0f}s" for n in JOB_GPUS)
        ideal = (" ".join(f"{r['ideal_at_peak_s'][n]:.0f}s" for n in JOB_GPUS)
                 if r["ideal_at_peak_s"] else "n/a")
        print(f"{r['job']:>12} {r['tokens']:>7} {r['total_flops'] / 1e15:8.1f} | {proj} | "
              f"{r['published_s_4gpu']:8.0f}s | {ideal} (1/4/8 dev)")


# --- main -----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, default=256, help="video tokens per sample (block/model)")
    p.add_argument("--batch", type=int, default=1, help="samples (2 = one CFG step)")
    p.add_argument("--text-len", type=int, default=397, help="context tokens (77 CLIP + 320 LLM)")
    p.add_argument("--layers", type=int, default=0, help="also time a whole N-layer model")
    p.add_argument("--attn", default="auto", choices=list(attention.NAMES))
    p.add_argument("--compile", action="store_true", help="torch.compile every block (warm-up compiles)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-small", action="store_true", help="skip the kit's small config")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.text_len <= 77:
        p.error(f"--text-len must exceed the 77 CLIP tokens, got {args.text_len}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    attention.set_backend(args.attn)
    name = device_name(device)
    print(f"device {name} | dtype {args.dtype} | attention {resolved_attention(device, dtype)} "
          f"| torch {torch.__version__}", flush=True)
    cases = []
    if not args.skip_small:
        cases.append(kit_small_case(args, device, dtype))
    cases.append(block_case(args, device, dtype))
    if args.layers:
        cases.append(model_case(args, device, dtype))
    cases = [c for c in cases if c is not None]
    block = next(c for c in cases if c["case"] == "block")
    peak = flops.device_peak(name) if device.type == "cuda" else None
    ref_peak, peak_label = (peak, f"{peak:g} TF") if peak else (989.0, "H100/H200 989 TF")
    rows = project_jobs(block["tflops"], ref_peak, args.text_len)
    print_projection(rows, block["tflops"], ref_peak, peak_label)
    report = {"device": name, "dtype": args.dtype, "torch": torch.__version__,
              "attention": resolved_attention(device, dtype), "args": vars(args),
              "cases": cases, "projection": rows, "ideal_peak_tflops": ref_peak}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
