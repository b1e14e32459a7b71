"""Service-side benchmark: Step-1 text encoding, CLIP encoding and one VAE chunk decode.

Time (median, warm-up excluded, synchronised on CUDA) and peak memory for each, with random weights
at the real sizes (``--size full``, for a GPU) or the tiny model's sizes (``--size tiny``, the CPU
default). Step-1 can be cut to ``--llm-layers`` layers; its time is then also scaled to 48 layers.

    python benchmark/perf/encoders_bench.py                                     # CPU, tiny sizes
    python benchmark/perf/encoders_bench.py --device cuda --dtype bfloat16 --size full
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from stepvideo.text_encoder.stepllm import PRESETS, Step1Model
from stepvideo.timing import device_name, peak_memory_gb, reset_peak_memory, time_call
from stepvideo.vae.vae import AutoencoderKL, VAEConfig

FULL_CLIP = dict(vocab_size=47020, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096, max_position_embeddings=512)
TINY_CLIP = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, max_position_embeddings=128)


@torch.no_grad()
def randomise(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Move a meta-built module to ``device``/``dtype``; norm weights 1, the rest N(0, 0.02)."""
    module = module.to(dtype).to_empty(device=device)
    for name, p in module.named_parameters():
        if "norm" in name.lower():
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0.0, 0.02)
    for name, b in module.named_buffers():  # BERT's position ids count up, token types are 0
        if b.dtype == torch.long:
            b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b) if "position" in name
                    else torch.zeros_like(b))
    return module.eval()


def measure(name: str, fn, device, args, **extra) -> dict:
    reset_peak_memory(device)
    times = time_call(fn, device, args.warmup, args.repeats)
    kind, mem = peak_memory_gb(device)
    row = {"case": name, "median_s": statistics.median(times), "times_s": times,
           "memory_kind": kind, "peak_memory_gb": mem, **extra}
    print(f"{name:>10}: median {row['median_s'] * 1e3:9.2f} ms | {kind} {mem:.2f} GiB | "
          + ", ".join(f"{k}={v}" for k, v in extra.items()), flush=True)
    return row


def step1_case(args, device, dtype) -> dict:
    cfg = PRESETS["step1" if args.size == "full" else "tiny"]
    layers = args.llm_layers or cfg.num_layers
    cfg_run = dataclasses.replace(cfg, num_layers=layers)
    with torch.device("meta"):
        model = Step1Model(cfg_run, attn_backend=args.llm_attn)
    model = randomise(model, device, dtype)
    ids = torch.randint(0, cfg.padded_vocab_size, (args.batch, args.llm_len), device=device)
    row = measure("step1", lambda: model(ids), device, args, layers=layers, tokens=args.llm_len,
                  batch=args.batch, attn=args.llm_attn)
    row["median_s_scaled_to_all_layers"] = row["median_s"] * cfg.num_layers / layers
    return row


def clip_case(args, device, dtype) -> dict:
    from stepvideo.text_encoder.clip import build_bert

    model = randomise(build_bert(FULL_CLIP if args.size == "full" else TINY_CLIP), device,
                      torch.float32)  # the release runs CLIP in float32
    ids = torch.randint(0, 100, (args.batch, 77), device=device)
    mask = torch.ones_like(ids)
    return measure("clip", lambda: model(input_ids=ids, attention_mask=mask), device, args,
                   batch=args.batch, tokens=77)


def vae_case(args, device, dtype) -> dict:
    cfg = VAEConfig() if args.size == "full" else VAEConfig.tiny()
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg)
    vae = randomise(vae, device, dtype)
    h, w = (34, 62) if args.size == "full" else (4, 6)
    z = torch.randn(1, 3, cfg.z_channels, h, w, device=device, dtype=dtype)
    return measure("vae_chunk", lambda: vae.decode(z), device, args,
                   latent=[1, 3, cfg.z_channels, h, w], frames_out=17, pixels=[16 * h, 16 * w])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--batch", type=int, default=2, help="prompts (2 = positive + negative)")
    p.add_argument("--llm-len", type=int, default=320)
    p.add_argument("--llm-layers", type=int, default=0, help="0 = all")
    p.add_argument("--llm-attn", default="sdpa", choices=["sdpa", "flex"])
    p.add_argument("--cases", default="step1,clip,vae")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"device {device_name(device)} | dtype {args.dtype} | size {args.size} | torch {torch.__version__}")
    cases = {"step1": step1_case, "clip": clip_case, "vae": vae_case}
    rows = [cases[c](args, device, dtype) for c in args.cases.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name(device), "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
