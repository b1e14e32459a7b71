"""Run by tests under ``torchrun``: denoise with the given degrees and save the final latents.

Usage: dist_worker.py TRANSFORMER_DIR OUT.safetensors --ulysses U --tp T --cfg C [--ring R]
       [--frames F --h H --w W --batch B --steps N] [--wrong-rope]
       [--cache MODE --threshold T --cfg-truncate F --cfg-every K]  (also saves the reused steps)
"""

import argparse
import functools
import os

import torch
from safetensors.torch import save_file

from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler
from stepvideo.conditioning import TextEmbeddings
from stepvideo.diffusion.cache import CacheConfig, StepCache
from stepvideo.diffusion.video_pipeline import denoise, initial_noise
from stepvideo.modules.model import StepVideoModel
from stepvideo.parallel import ParallelConfig, setup_parallel


def text_for(model, batch: int) -> TextEmbeddings:
    """Deterministic [positive..., negative...] conditioning with uneven masks."""
    g = torch.Generator().manual_seed(11)
    llm, clip = model.config.caption_channels
    n = 2 * batch
    y, c = torch.randn(n, 10, llm, generator=g), torch.randn(n, 5, clip, generator=g)
    mask = torch.ones(n, 15)
    for i in range(n):
        mask[i, 15 - (i % 4):] = 0
    return TextEmbeddings(y, mask, c)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("transformer_dir")
    p.add_argument("out")
    for name in ("ulysses", "ring", "tp", "cfg"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--h", type=int, default=3)
    p.add_argument("--w", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--wrong-rope", action="store_true")
    p.add_argument("--cache", default="none")
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--cfg-truncate", type=float, default=None)
    p.add_argument("--cfg-every", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    model = StepVideoModel.from_pretrained(a.transformer_dir)
    cfg = ParallelConfig(a.ulysses, a.ring, a.tp, a.cfg)
    ctx = setup_parallel(cfg, model.config.num_attention_heads)
    ctx.apply(model)
    if a.wrong_rope:  # feed each rank the RoPE tables of another shard: must break parity
        plan, shard = ctx.plan, ctx.plan.shard
        plan.shard = lambda x, dim: shard(x, dim) if dim != 0 else shard(x.roll(x.shape[0] // 2, 0), dim)
    text = text_for(model, a.batch)
    latents = initial_noise((a.batch, a.frames, model.config.in_channels, a.h, a.w), seed=123)
    sched = FlowMatchDiscreteScheduler()
    sched.set_timesteps(a.steps, 13.0)
    cache = CacheConfig(a.cache, a.threshold, cfg_truncate=a.cfg_truncate, cfg_every=a.cfg_every)
    step_cache = None
    if cache.enabled:
        step_cache = StepCache(cache, a.steps, functools.partial(ctx.all_reduce_sum, device="cpu"))
    with torch.inference_mode():
        out = denoise(model, latents, text, sched, 9.0, cfg=ctx.cfg, cache=step_cache)
    if ctx.is_main:
        saved = {"latents": out.contiguous()}
        if step_cache is not None:
            report = step_cache.report()
            saved["reused"] = torch.tensor(report["reused_steps"] or [-1])
            saved["negative_reused"] = torch.tensor(report["negative_reused_steps"] or [-1])
            saved["evaluations"] = torch.tensor([report["dit_evaluations"]])
        save_file(saved, a.out)
    ctx.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
