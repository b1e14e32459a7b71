"""Step caching / CFG truncation: speed-up against quality loss, per prompt, against the exact path.

    # a model directory (real weights: how to pick a threshold; the tiny model: mechanics only)
    python benchmark/perf/cache_quality.py --model_dir MODEL --prompts prompts.txt \\
        --setting teacache:0.23 --setting first_block:0.1 --setting cfg_truncate:0.5/4 \\
        --setting teacache:0.23+cfg_truncate:0.5/4 --json benchmark/results/cache_quality.json
    # the GPU check: random 30B weights, DiT time only (no text encoder, no VAE, no quality);
    # a 17-frame clip (6,324 tokens) instead of 204 frames keeps it within minutes on an H200
    python benchmark/perf/cache_quality.py --random_dit --device cuda --dtype bfloat16 \\
        --num_frames 17 --setting teacache:0.23 --setting teacache:1e9 --setting first_block:0.1 \\
        --setting cfg_truncate:0.5/4 --json benchmark/results/h200_cache_speed.json

For each prompt and seed, the exact path runs first, then every ``--setting`` with the same seed
and text embeddings. Each run reports the DiT evaluations (one branch of one step = 1; exact =
2 x steps), the denoise wall time (device synchronised; ``--warmup_runs`` untimed exact runs first),
the speed-ups over the exact run, and PSNR / SSIM of the decoded uint8 frames against the exact
video's (SSIM: Gaussian 11x11, sigma 1.5, per channel and frame, averaged). Prints a table with the
mean over prompts and writes --json.

A setting is ``MODE:THRESHOLD`` (``teacache``, ``first_block``) and/or ``cfg_truncate:F[/K]``,
joined by ``+``; ``--cache_warmup`` applies to all. With ``--random_dit`` the DiT has random weights
(``DiTConfig`` defaults, ``--layers``/``--heads`` to shrink it) and random text; only evaluations,
time and the latents' relative error are reported: random weights say nothing about quality.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from stepvideo.conditioning import TextEmbeddings
from stepvideo.devices import DTYPE_CHOICES, dtype_name, resolve_dtype
from stepvideo.diffusion.cache import CacheConfig
from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler, load_scheduler
from stepvideo.diffusion.video_pipeline import (NEG_MAGIC, POS_MAGIC, PRESETS, StepVideoPipeline,
                                                VideoSize)
from stepvideo.modules.model import DiTConfig, StepVideoModel
from stepvideo.timing import device_name, peak_memory_gb, reset_peak_memory, sync

EXACT = "exact"


# --- settings ---------------------------------------------------------------------------------

def parse_setting(spec: str, warmup: int = 1) -> CacheConfig:
    """``teacache:0.23``, ``first_block:0.1``, ``cfg_truncate:0.5/4`` or a ``+``-joined pair."""
    kw: dict = {"warmup": warmup}
    for part in spec.split("+"):
        name, _, value = part.partition(":")
        if name in ("teacache", "first_block") and value:
            kw.update(mode=name, threshold=float(value))
        elif name == "cfg_truncate" and value:
            frac, _, every = value.partition("/")
            kw.update(cfg_truncate=float(frac), cfg_every=int(every or 4))
        else:
            raise ValueError(f"setting {spec!r}: expected teacache:T, first_block:T or "
                             f"cfg_truncate:F[/K], joined by '+'")
    return CacheConfig(**kw)


# --- quality ----------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of uint8 tensors of one shape; inf when they are equal."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004; L = 255, K1 = 0.01, K2 = 0.03) of uint8 frames (..., H, W, C),
    per channel and frame over valid 11x11 Gaussian windows."""
    x = a.reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2).double()  # (N, C, H, W)
    y = b.reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2).double()
    c = x.shape[1]
    w = _gaussian_window().expand(c, 1, 11, 11)
    blur = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean().item()


# --- the runs ---------------------------------------------------------------------------------

def timed_sample(pipe: StepVideoPipeline, text: TextEmbeddings, args, seed: int,
                 cache: CacheConfig | None) -> tuple[torch.Tensor, dict]:
    device = pipe.device
    reset_peak_memory(device)
    sync(device)
    start = time.perf_counter()
    x = pipe.sample(text, VideoSize.rounded(args.num_frames, args.height, args.width),
                    args.infer_steps, args.cfg_scale, args.time_shift, seed=seed,
                    progress=False, cache=cache)
    sync(device)
    seconds = time.perf_counter() - start
    stats = pipe.cache_stats
    return x, {"denoise_s": seconds, "dit_evaluations": stats["dit_evaluations"],
               "dit_evaluations_exact": stats["dit_evaluations_exact"],
               "reused_steps": stats["reused_steps"],
               "negative_reused_steps": stats["negative_reused_steps"],
               "peak_memory_gib": peak_memory_gb(device)[1] if device.type == "cuda" else None}


def compare(row: dict, exact_row: dict, out: torch.Tensor, exact_out: torch.Tensor,
            frames: bool) -> dict:
    row["eval_speedup"] = row["dit_evaluations_exact"] / max(row["dit_evaluations"], 1)
    row["wall_speedup"] = exact_row["denoise_s"] / row["denoise_s"]
    if frames:
        p = psnr(out, exact_out)
        row.update(psnr_db=None if math.isinf(p) else p, identical=math.isinf(p),
                   ssim=ssim(out, exact_out))
    else:
        err = (out - exact_out).norm() / exact_out.norm()
        row.update(latent_rel_err=err.item())
    return row


def load_pipeline(args, device: torch.device, dtype: torch.dtype) -> StepVideoPipeline:
    """The model directory's DiT, with in-process text encoders and VAE (or the service's)."""
    pipe = StepVideoPipeline.from_pretrained(args.model_dir, dtype, device)
    if args.vae_url:
        return pipe.setup_api(args.vae_url, args.caption_url or args.vae_url)
    from stepvideo.text_encoder.local import LocalTextEncoder
    from stepvideo.vae.local import LocalVAE

    side = resolve_dtype(args.encoder_dtype, device)
    root = args.model_dir.rstrip("/")
    pipe.text_encoder = LocalTextEncoder.from_dirs(f"{root}/step_llm", f"{root}/hunyuan_clip",
                                                   side, device)
    pipe.vae = LocalVAE.from_dir(f"{root}/vae", side, device)
    return pipe


def random_pipeline(args, device: torch.device, dtype: torch.dtype) -> StepVideoPipeline:
    """A DiTConfig-default DiT (optionally fewer layers/heads) with N(0, 0.02) weights."""
    cfg = DiTConfig(num_layers=args.layers or DiTConfig.num_layers,
                    num_attention_heads=args.heads or DiTConfig.num_attention_heads)
    with torch.device("meta"):
        model = StepVideoModel.from_config(cfg).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    return StepVideoPipeline(model.eval(), FlowMatchDiscreteScheduler())


def random_text(cfg: DiTConfig, device, dtype, seed: int = 0) -> TextEmbeddings:
    """[positive, negative] random embeddings: 320 LLM + 77 CLIP tokens, all attended."""
    g = torch.Generator().manual_seed(seed)
    llm, clip = cfg.caption_channels
    return TextEmbeddings(torch.randn(2, 320, llm, generator=g), torch.ones(2, 397),
                          torch.randn(2, 77, clip, generator=g)).to(device, dtype)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    settings = {spec: parse_setting(spec, args.cache_warmup) for spec in args.setting}
    if args.random_dit:
        pipe = random_pipeline(args, device, dtype)
        prompts = ["<random text>"]
    else:
        pipe = load_pipeline(args, device, dtype)
        prompts = read_prompts(args)
    rows = []
    for p_index, prompt in enumerate(prompts):
        text = (random_text(pipe.transformer.config, device, dtype) if args.random_dit
                else pipe.encode_prompt([prompt], POS_MAGIC, NEG_MAGIC))
        for seed in args.seeds:
            if p_index == 0 and seed == args.seeds[0]:
                for _ in range(args.warmup_runs):  # compile/allocator/kernel selection warm-up
                    timed_sample(pipe, text, args, seed, None)
            exact_x, exact_row = timed_sample(pipe, text, args, seed, None)
            exact_out = exact_x if args.random_dit else pipe.decode_uint8(exact_x)
            for name, cache in [(EXACT, None), *settings.items()]:
                x, row = (exact_x, dict(exact_row)) if cache is None else timed_sample(
                    pipe, text, args, seed, cache)
                out = x if args.random_dit else pipe.decode_uint8(x)
                row = {"prompt": prompt, "seed": seed, "setting": name,
                       **compare(row, exact_row, out, exact_out, not args.random_dit)}
                rows.append(row)
                print_row(row)
    return {"device": device_name(device), "dtype": dtype_name(dtype), "host": platform.node(),
            "torch": torch.__version__,
            "model": "random DiT (no quality measure)" if args.random_dit else args.model_dir,
            "dit_layers": pipe.transformer.config.num_layers,
            "dit_heads": pipe.transformer.config.num_attention_heads,
            "size": {"num_frames": args.num_frames, "height": args.height, "width": args.width},
            "infer_steps": args.infer_steps, "cfg_scale": args.cfg_scale,
            "time_shift": args.time_shift, "rows": rows, "mean": means(rows)}


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit("give --prompt or --prompts")
    return prompts


METRICS = ("dit_evaluations", "eval_speedup", "denoise_s", "wall_speedup", "psnr_db", "ssim",
           "latent_rel_err")


def means(rows: list[dict]) -> dict:
    """Per setting, each metric's mean over prompts and seeds (PSNR over non-identical runs)."""
    out = {}
    for name in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == name]
        out[name] = {m: statistics.fmean(vals) if (vals := [r[m] for r in group
                                                            if r.get(m) is not None]) else None
                     for m in METRICS if any(m in r for r in group)}
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def print_row(row: dict) -> None:
    quality = (f"psnr {'inf' if row.get('identical') else _fmt(row['psnr_db'])} dB  "
               f"ssim {_fmt(row['ssim'])}" if "ssim" in row
               else f"latent rel err {_fmt(row['latent_rel_err'])}")
    print(f"{row['prompt'][:40]:40s} seed {row['seed']:<6} {row['setting']:32s} "
          f"evals {row['dit_evaluations']:>4}/{row['dit_evaluations_exact']:<4} "
          f"({row['eval_speedup']:.2f}x)  {row['denoise_s']:8.2f} s ({row['wall_speedup']:.2f}x)  "
          f"{quality}", flush=True)


def print_table(result: dict) -> None:
    print(f"\nmean over prompts and seeds ({result['device']}, {result['dtype']}, "
          f"{result['model']}):")
    cols = [m for m in METRICS if any(m in v for v in result["mean"].values())]
    print(f"{'setting':32s} " + " ".join(f"{c:>14s}" for c in cols))
    for name, vals in result["mean"].items():
        print(f"{name:32s} " + " ".join(f"{_fmt(vals.get(c)):>14s}" for c in cols))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model_dir", help="a stepvideo-t2v folder (official layout)")
    g.add_argument("--random_dit", action="store_true", help="random weights: speed only")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--setting", action="append", default=[],
                   help="teacache:T, first_block:T, cfg_truncate:F[/K], '+'-joined (repeatable)")
    p.add_argument("--cache_warmup", type=int, default=1)
    p.add_argument("--vae_url", default="", help="use the caption/VAE service instead of "
                   "in-process encoders and VAE")
    p.add_argument("--caption_url", default="")
    base = PRESETS["base"]
    p.add_argument("--infer_steps", type=int, default=base.num_inference_steps)
    p.add_argument("--cfg_scale", type=float, default=base.guidance_scale)
    p.add_argument("--time_shift", type=float, default=base.time_shift)
    p.add_argument("--num_frames", type=int, default=base.num_frames)
    p.add_argument("--height", type=int, default=base.height)
    p.add_argument("--width", type=int, default=base.width)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--encoder_dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--layers", type=int, default=0, help="--random_dit: blocks (0: 48)")
    p.add_argument("--heads", type=int, default=0, help="--random_dit: heads of 128 (0: 48)")
    p.add_argument("--warmup_runs", type=int, default=1, help="untimed exact runs first")
    p.add_argument("--json", default="", help="write the results here")
    a = p.parse_args(argv)
    if not a.setting:
        p.error("give at least one --setting, e.g. teacache:0.23")
    for spec in a.setting:
        try:
            parse_setting(spec, a.cache_warmup)
        except ValueError as e:
            p.error(str(e))
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
