"""--quantize fp8_weight: the output error of FP8 weight storage against bf16 and fp32, on the CPU.

Two cases, each a few Euler steps of the CFG loop from the same noise and text:
- ``full_width``: the DiT at its real width (48 heads x 128 = 6144, FFN 24576) with ``--layers``
  blocks (default 1) and the conformance kit's random initialisation, at a small latent;
- ``tiny``: the tiny model (``stepvideo.tiny``) end to end through the DiT, 17 x 64 x 96.

For each: latents after N steps with the DiT in fp32, bf16 and bf16 + FP8 weights (``stepvideo.quant``:
e4m3 with per-output-channel scales, dequantised at use); max/mean abs difference, relative L2 and cosine
of fp8 against bf16 and against fp32 (and bf16 against fp32, the scale of what bf16 already does).

    python benchmark/perf/fp8_weight_error.py --json benchmark/results/cpu_fp8_weight_error.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time

import torch

from stepvideo.conditioning import TextEmbeddings
from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler
from stepvideo.diffusion.video_pipeline import denoise, initial_noise
from stepvideo.modules.model import DiTConfig, StepVideoModel
from stepvideo.quant import error_stats, quantize_dit
from stepvideo.tiny import init_like_kit, write_tiny_model


def random_text(cfg: DiTConfig, gen: torch.Generator, llm_len: int = 20, clip_len: int = 7):
    llm_dim, clip_dim = cfg.caption_channels
    mask = torch.ones(2, clip_len + llm_len, dtype=torch.long)
    mask[1, clip_len + llm_len // 2:] = 0  # the negative prompt is shorter
    return TextEmbeddings(torch.randn(2, llm_len, llm_dim, generator=gen), mask,
                          torch.randn(2, clip_len, clip_dim, generator=gen))


def run(model: StepVideoModel, dtype: torch.dtype, noise: torch.Tensor, text: TextEmbeddings,
        steps: int) -> torch.Tensor:
    sched = FlowMatchDiscreteScheduler()
    sched.set_timesteps(steps, 13.0)
    with torch.inference_mode():
        return denoise(model, noise, text.to(None, dtype), sched, 9.0)


def compare(model32: StepVideoModel, noise, text, steps: int) -> dict:
    t0 = time.perf_counter()
    ref32 = run(model32, torch.float32, noise, text, steps)
    bf16 = copy.deepcopy(model32).to(torch.bfloat16)
    ref16 = run(bf16, torch.bfloat16, noise, text, steps)
    fp8 = copy.deepcopy(bf16)
    quantize_dit(fp8, "fp8_weight")
    out8 = run(fp8, torch.bfloat16, noise, text, steps)
    return {"steps": steps, "latent_shape": list(noise.shape),
            "fp8_vs_bf16": error_stats(out8, ref16), "fp8_vs_fp32": error_stats(out8, ref32),
            "bf16_vs_fp32": error_stats(ref16, ref32), "latent_abs_mean": ref32.abs().mean().item(),
            "seconds": round(time.perf_counter() - t0, 1)}


def full_width_case(layers: int, steps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    cfg = DiTConfig(num_layers=layers)
    with torch.device("meta"):
        model = StepVideoModel.from_config(cfg)
    model = model.to_empty(device="cpu").float().eval()
    init_like_kit(model, gen)
    noise = initial_noise((1, 3, cfg.in_channels, 4, 6), seed=1)
    return {"case": f"full_width ({layers} block(s), dim {cfg.inner_dim}, 72 tokens)",
            **compare(model, noise, random_text(cfg, gen), steps)}


def tiny_case(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        model = StepVideoModel.from_pretrained(write_tiny_model(d, seed=0), torch.float32)
    gen = torch.Generator().manual_seed(0)
    noise = initial_noise((1, 3, model.config.in_channels, 4, 6), seed=1)
    return {"case": "tiny model (17 x 64 x 96)", **compare(model, noise, random_text(model.config, gen),
                                                           steps)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1, help="blocks of the full-width DiT")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torchao

    cases = [tiny_case(a.steps), full_width_case(a.layers, a.steps)]
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "torchao": torchao.__version__, "threads": torch.get_num_threads(), "cases": cases}
    for c in cases:
        print(c["case"], json.dumps({k: {m: f"{v:.3g}" for m, v in c[k].items()}
                                     for k in ("fp8_vs_bf16", "fp8_vs_fp32", "bf16_vs_fp32")}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
