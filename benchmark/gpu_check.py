"""One prepared GPU check (run on a lent H100/H200): the CUDA paths against the CPU reference.

1. the kit's small DiT on CUDA (fp32 with TF32 off, and bf16) against the kit's output;
2. the attention seam: CUDA SDPA (and flash-attn when installed) against CPU fp32, with a mask;
3. --parallel_backend xfuser (xfuser 0.4.5's environment and xFuserLongContextAttention) against
   the torch backend at world size 1 (NCCL), on the tiny DiT and one full-width block, per kernel;
4. the full-size VAE decoding one chunk (1,3,64,34,62) in bf16: time and peak memory;
5. the tiny model's whole pipeline in-process on CUDA (bf16) against the same seed on the CPU (fp32);
6. the real service on CUDA: round trips equal the in-process classes; the pipeline through it.
Prints one JSON line per check and writes them all to --json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import torch

RESULTS: list[dict] = []
# bf16 limits: a few bf16 steps at |x| ~ 3.6 (the kit DiT's output scale); measured 0.027 on the CPU.
BF16_LIMIT = 0.1
ATTN_LIMITS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SAGE_LIMIT = 0.1  # INT8 Q.K^T: a looser bound, for N(0,1) inputs (outputs of order 0.1)


def report(name: str, **values) -> None:
    row = {"check": name, **values}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def guarded(fn):
    @functools.wraps(fn)
    def run(*a, **k):
        try:
            fn(*a, **k)
        except Exception as e:  # a failed check is reported and the next one still runs
            report(fn.__name__, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
    return run


def kit_model(device, dtype):
    from stepvideo.conformance import load_json, load_tensors
    from stepvideo.modules.model import StepVideoModel
    from stepvideo.weights import load_state_dict_strict

    spec = load_json("dit_small.json")
    with torch.device("meta"):
        m = StepVideoModel(**spec["config"])
    sd = {k: v.to(device, dtype) for k, v in load_tensors(spec["weights"]["file"], torch.float32).items()}
    load_state_dict_strict(m, sd)
    io = load_tensors("dit_small_io.safetensors")
    return m.eval(), io, spec


def run_kit(m, io, device, dtype):
    args = [io[k].to(device) for k in ("hidden_states", "timestep", "encoder_hidden_states",
                                       "encoder_hidden_states_2", "encoder_attention_mask")]
    # the timestep (1) stays float32, as the pipeline passes it; the mask (4) is a count
    args = [a.to(dtype) if a.is_floating_point() and i not in (1, 4) else a for i, a in enumerate(args)]
    with torch.inference_mode():
        return m(*args, return_dict=False).float().cpu()


@guarded
def dit_kit():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        m, io, spec = kit_model("cuda", dtype)
        out = run_kit(m, io, "cuda", dtype)
        err = (out - io["output"]).abs().max().item()
        limit = spec["tolerance"]["atol"] if dtype == torch.float32 else BF16_LIMIT
        report("dit_kit_cuda", dtype=str(dtype), max_abs_err=err, limit=limit, ok=err <= limit,
               output_max=io["output"].abs().max().item())


@guarded
def attention_seam():
    """Every installed backend against CPU fp32 SDPA: no mask, the text mask, fewer keys than queries
    (an uneven Ulysses split). The 8-bit ``sage`` backend is reported against a looser limit."""
    from stepvideo.modules.attention import BACKENDS, available_backends

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 128, generator=g) for _ in range(3))
    lens = torch.tensor([300, 123])
    cases = {"none": (k, v, None), "text_mask": (k, v, lens), "uneven_keys": (k[:, :271], v[:, :271], None)}
    for name in available_backends():
        for dtype in (torch.float32, torch.bfloat16) if name == "sdpa" else (torch.bfloat16,):
            for case, (kk, vv, kv) in cases.items():
                ref = BACKENDS["sdpa"].fn(q, kk, vv, kv)
                out = BACKENDS[name].fn(*(t.cuda().to(dtype) for t in (q, kk, vv)),
                                        None if kv is None else kv.cuda())
                err = (out.float().cpu() - ref).abs().max().item()
                limit = ATTN_LIMITS[dtype] if BACKENDS[name].exact else SAGE_LIMIT
                report("attention_seam", backend=name, dtype=str(dtype), case=case,
                       max_abs_err=err, limit=limit, ok=err <= limit)
    report("attention_seam_backends", available=available_backends())


@guarded
def xfuser_vs_torch():
    """--parallel_backend xfuser against the torch backend on one GPU (world size 1, NCCL): xfuser's
    real environment (init_distributed_environment + initialize_model_parallel) and its
    xFuserLongContextAttention, per kernel, on the tiny DiT and on one full-width block (48 x 128
    heads, 6144 wide). One GPU cannot run NCCL ranks side by side, so the all-to-all and ring are
    of size 1 here; their multi-rank numerics are the torch backend's gloo tests' territory."""
    import importlib.util
    import tempfile

    import torch.distributed as dist

    from stepvideo.modules.model import DiTConfig, StepVideoModel
    from stepvideo.parallel import LaunchEnv, ParallelConfig
    from stepvideo.parallel.torch_backend import Groups, UlyssesPlan
    from stepvideo.parallel.xfuser_backend import (ATTN_TYPES, XFuserPlan, check_xfuser,
                                                   installed_versions)
    from stepvideo.tiny import write_tiny_model

    report("xfuser_versions", **installed_versions())
    config, env = ParallelConfig(), LaunchEnv()
    check_xfuser(config, "cuda")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29631")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    groups = Groups(config, 0)
    dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        tiny = StepVideoModel.from_pretrained(write_tiny_model(tmp) + "/transformer", dtype, "cuda")
    torch.manual_seed(0)
    with torch.device("meta"):
        wide = StepVideoModel.from_config(DiTConfig(num_layers=1)).to(dtype)
    wide = wide.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in wide.named_parameters():
            p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0, 0.02)
    for name, model, grid in (("tiny", tiny.eval(), (3, 8, 8)), ("full_width_block", wide.eval(),
                                                                  (4, 16, 16))):
        inputs = _dit_inputs(model.config, grid, dtype)
        model.plan = UlyssesPlan(groups)
        with torch.inference_mode():
            ref = model(**inputs, return_dict=False).float()
        for attn_type in ATTN_TYPES:
            if attn_type == "fa" and importlib.util.find_spec("flash_attn") is None:
                report("xfuser_vs_torch", model=name, attn_type=attn_type,
                       skipped="flash-attn not installed")
                continue
            model.plan = XFuserPlan(groups, env, attn_type)
            with torch.inference_mode():
                out = model(**inputs, return_dict=False).float()
            err = (out - ref).abs().max().item()
            report("xfuser_vs_torch", model=name, attn_type=attn_type, tokens=grid[0] * grid[1] * grid[2],
                   max_abs_err=err, ref_max=ref.abs().max().item(), ok=err <= BF16_LIMIT)


def _dit_inputs(cfg, grid, dtype, batch: int = 2, text_len: int = 24, clip_len: int = 8,
                device: str = "cuda") -> dict:
    """Seeded DiT inputs at batch 2; the second sample's text is 5 tokens shorter (masked)."""
    g = torch.Generator().manual_seed(1)
    f, h, w = grid
    p, (llm, clip) = cfg.patch_size, cfg.caption_channels
    mask = torch.ones(batch, text_len)
    mask[1, text_len - 5:] = 0
    t = {"hidden_states": torch.randn(batch, f, cfg.in_channels, h * p, w * p, generator=g),
         "timestep": torch.rand(batch, generator=g),
         "encoder_hidden_states": torch.randn(batch, text_len - clip_len, llm, generator=g),
         "encoder_hidden_states_2": torch.randn(batch, clip_len, clip, generator=g)}
    t = {k: v.to(device, dtype) if k != "timestep" else v.to(device) for k, v in t.items()}
    return {**t, "encoder_attention_mask": mask.to(device)}


@guarded
def vae_chunk():
    from stepvideo.vae.vae import AutoencoderKL

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKL().to(torch.bfloat16).eval()
    for p in vae.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    z = torch.randn(1, 3, 64, 34, 62, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for i in range(2):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = vae.decode(z)
            torch.cuda.synchronize()
            report("vae_full_chunk_decode_bf16", run=i, seconds=time.perf_counter() - t0,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, out_shape=list(out.shape),
                   ok=bool(torch.isfinite(out).all()))


@guarded
def tiny_pipeline_cuda():
    import tempfile

    from stepvideo.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        outs = _tiny_pipeline_runs(write_tiny_model(tmp))
    diff = (outs["cuda"] - outs["cpu"]).abs()
    # bf16 text encoders + DiT + VAE against fp32: measured max 0.12, mean 0.013 on an H200
    report("tiny_pipeline_cuda_vs_cpu", max_abs=diff.max().item(), mean_abs=diff.mean().item(),
           value_range=[outs["cpu"].min().item(), outs["cpu"].max().item()],
           ok=diff.mean().item() <= 0.05)


def _tiny_pipeline_runs(root: str) -> dict:
    from stepvideo.diffusion.video_pipeline import StepVideoPipeline
    from stepvideo.text_encoder.local import LocalTextEncoder
    from stepvideo.vae.local import LocalVAE

    outs = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        t0 = time.perf_counter()
        pipe = StepVideoPipeline.from_pretrained(root, dtype=dtype, device=device)
        pipe.text_encoder = LocalTextEncoder.from_dirs(f"{root}/step_llm", f"{root}/hunyuan_clip",
                                                      dtype=dtype, device=device)
        pipe.vae = LocalVAE.from_dir(f"{root}/vae", dtype=dtype, device=device)
        video = pipe("a red fox in the snow", num_frames=17, height=128, width=128,
                     num_inference_steps=4, seed=7, output_type="tensor", return_dict=False)
        outs[device] = video.float().cpu()
        report("tiny_pipeline", device=device, dtype=str(dtype), seconds=time.perf_counter() - t0,
               shape=list(video.shape), ok=bool(torch.isfinite(video).all()))
    return outs


@guarded
def service_cuda(device: str = "cuda"):
    """The real service on the GPU: round trips equal the same classes in-process on the GPU."""
    import socket
    import subprocess
    import tempfile

    from stepvideo.diffusion.video_pipeline import StepVideoPipeline
    from stepvideo.service.client import RemoteTextEncoder, RemoteVAE
    from stepvideo.text_encoder.local import LocalTextEncoder
    from stepvideo.vae.local import LocalVAE
    from stepvideo.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as sock:
        root = write_tiny_model(tmp)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        server = subprocess.Popen([sys.executable, "api/call_remote_server.py", "--model_dir", root,
                                   "--port", str(port), "--device", device, "--cache_size", "0"])
        try:
            url = f"127.0.0.1:{port}"
            RemoteTextEncoder(url).wait_ready(timeout=120)
            prompts = ["a red fox in the snow", "画面暗、低分辨率"]
            remote = RemoteTextEncoder(url).encode(prompts)
            local = LocalTextEncoder.from_dirs(f"{root}/step_llm", f"{root}/hunyuan_clip",
                                               device=device).encode(prompts)
            same_text = all(torch.equal(getattr(remote, f), getattr(local, f).cpu())
                            for f in ("y", "mask", "clip"))
            z = torch.randn(1, 3, 16, 4, 4, generator=torch.Generator().manual_seed(0))
            vae_remote = RemoteVAE(url).decode_uint8(z)
            vae_local = LocalVAE.from_dir(f"{root}/vae", device=device).decode_uint8(z.to(device))
            same_vae = torch.equal(vae_remote, vae_local.cpu())
            report("service_cuda_round_trip", text_equal=same_text, vae_uint8_equal=same_vae,
                   ok=same_text and same_vae)
            pipe = StepVideoPipeline.from_pretrained(root, dtype=torch.bfloat16, device=device)
            pipe.setup_api(url, url)
            video = pipe("a red fox", num_frames=17, height=64, width=64, num_inference_steps=2,
                         seed=3, output_type="tensor", return_dict=False)
            report("pipeline_via_service_cuda", shape=list(video.shape),
                   ok=bool(torch.isfinite(video.float()).all()))
        finally:
            server.terminate()
            server.wait(timeout=30)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="gpu_check.json")
    p.add_argument("--skip", default="", help="comma-separated checks to skip")
    a = p.parse_args()
    report("env", torch=torch.__version__, device=torch.cuda.get_device_name(0),
           cuda=torch.version.cuda)
    skip = set(filter(None, a.skip.split(",")))
    for check in (dit_kit, attention_seam, xfuser_vs_torch, vae_chunk, tiny_pipeline_cuda, service_cuda):
        if check.__name__ not in skip:
            check()
    with open(a.json, "w") as f:
        json.dump(RESULTS, f, indent=1)
    failed = [r["check"] for r in RESULTS if "error" in r or r.get("ok") is False]
    print(f"{len(RESULTS)} results, {len(failed)} failed: {failed}" if failed else
          f"{len(RESULTS)} results, all within their limits")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
