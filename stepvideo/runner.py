"""The torchrun job: flags -> ``GenerationRequest`` -> checks -> denoise on every rank -> decode and
write on rank 0. ``run_parallel.py`` is a thin entry over ``main``; the benchmark reuses
``VideoGenerator`` to run many prompts with one loaded model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from . import __version__
from .diffusion.scheduler import load_scheduler
from .diffusion.video_pipeline import (DEFAULT_SEED, NEG_MAGIC, POS_MAGIC, PRESETS, StepVideoPipeline,
                                       TextEmbeddings, VideoSize, cfg_prompts, guided_velocity)
from .fileio import write_json_atomic
from .parallel import ParallelConfig, ParallelContext, setup_parallel
from .weights import CheckpointError, read_json


class PreflightError(RuntimeError):
    """A problem found before any expensive work; printed as one line by rank 0."""


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one run needs; built from the CLI flags or by scripts."""

    model_dir: str
    prompt: str = ""
    transformer_dir: str | None = None
    vae_url: str = "127.0.0.1"
    caption_url: str = "127.0.0.1"
    infer_steps: int = PRESETS["base"].num_inference_steps
    cfg_scale: float = PRESETS["base"].guidance_scale
    time_shift: float = PRESETS["base"].time_shift
    num_frames: int = PRESETS["base"].num_frames
    height: int = PRESETS["base"].height
    width: int = PRESETS["base"].width
    seed: int = DEFAULT_SEED
    save_path: str = "./results"
    name_suffix: str = ""
    pos_magic: str = POS_MAGIC
    neg_magic: str = NEG_MAGIC
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    parallel_backend: str = "torch"
    attn_backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    denoise_filter: bool = True
    crop_540p: bool = True
    contact_sheet: bool = True
    preset: str = "base"
    compile: bool = False

    @property
    def size(self) -> VideoSize:
        return VideoSize.rounded(self.num_frames, self.height, self.width)


# --- command line -------------------------------------------------------------------------------

def build_parser(prog: str = "run_parallel.py", require_prompt: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Generate a video with Step-Video-T2V. Launch with torchrun; the DiT's tokens are "
                    "split over the ranks, the text encoders and VAE run in the caption/VAE service "
                    "(api/call_remote_server.py). Rank 0 writes <save_path>/<name>.mp4, a .json "
                    "sidecar and a .png contact sheet.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and service")
    g.add_argument("--model_dir", required=True, help="stepvideo-t2v folder (official layout)")
    g.add_argument("--transformer_dir", default=None,
                   help="a different transformer/ (e.g. Turbo) used with --model_dir's scheduler")
    g.add_argument("--vae_url", default="127.0.0.1", help="VAE service: host, host:port or URL")
    g.add_argument("--caption_url", default="127.0.0.1", help="caption service: host, host:port or URL")
    g = p.add_argument_group("parallelism (world size = ulysses x ring x tensor_parallel x cfg)")
    g.add_argument("--ulysses_degree", type=int, default=1, help="sequence-parallel all-to-all degree; must divide 48 heads")
    g.add_argument("--ring_degree", type=int, default=1, help="sequence-parallel ring degree")
    g.add_argument("--tensor_parallel_degree", type=int, default=1, help="shard heads and MLP over this many ranks")
    g.add_argument("--cfg_parallel", action="store_true",
                   help="run the positive and negative halves of CFG on two rank groups")
    g.add_argument("--parallel_backend", choices=["torch", "xfuser"], default="torch",
                   help="torch: torch.distributed (NCCL/gloo); xfuser: yunchang/xDiT kernels on GPUs")
    g.add_argument("--attn_backend", choices=["auto", "sdpa", "flash"], default="auto",
                   help="single-device attention kernel")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (about 30 s once; on an H200 a 30B step is 9%% "
                        "faster and peaks 11%% lower)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="DiT weights/activations; auto = bfloat16 on CUDA, float32 on CPU")
    g = p.add_argument_group("sampling")
    if require_prompt:
        g.add_argument("--prompt", required=True, help="what the video shows")
    g.add_argument("--preset", choices=sorted(PRESETS), default="base",
                   help="defaults for steps/cfg/shift: base 50/9.0/13.0, turbo 15/5.0/17.0")
    g.add_argument("--infer_steps", type=int, default=None, help="denoising steps (preset)")
    g.add_argument("--cfg_scale", type=float, default=None, help="classifier-free guidance (preset)")
    g.add_argument("--time_shift", type=float, default=None, help="schedule time shift (preset)")
    base = PRESETS["base"]
    g.add_argument("--num_frames", type=int, default=base.num_frames, help="rounded down to a multiple of 17")
    g.add_argument("--height", type=int, default=base.height, help="rounded down to a multiple of 16")
    g.add_argument("--width", type=int, default=base.width, help="rounded down to a multiple of 16")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help="decides the initial noise")
    g.add_argument("--pos_magic", default=POS_MAGIC, help="appended to the prompt")
    g.add_argument("--neg_magic", default=NEG_MAGIC, help="the negative prompt")
    g = p.add_argument_group("output")
    g.add_argument("--save_path", default="./results", help="output directory")
    g.add_argument("--name_suffix", default="", help="appended to the output file names")
    g.add_argument("--no_denoise_filter", action="store_true", help="skip ffmpeg's atadenoise")
    g.add_argument("--no_crop", action="store_true", help="keep the full frame (no 540p crop)")
    return p


def request_from_args(argv: list[str] | None = None) -> GenerationRequest:
    return request_from_namespace(build_parser().parse_args(argv))


def request_from_namespace(a: argparse.Namespace) -> GenerationRequest:
    """The request for parsed flags (presets applied); ``prompt`` is empty when there is none."""
    preset = PRESETS[a.preset]
    return GenerationRequest(
        model_dir=a.model_dir, transformer_dir=a.transformer_dir, prompt=getattr(a, "prompt", ""),
        vae_url=a.vae_url, caption_url=a.caption_url,
        infer_steps=a.infer_steps or preset.num_inference_steps,
        cfg_scale=preset.guidance_scale if a.cfg_scale is None else a.cfg_scale,
        time_shift=preset.time_shift if a.time_shift is None else a.time_shift,
        num_frames=a.num_frames, height=a.height, width=a.width, seed=a.seed,
        save_path=a.save_path, name_suffix=a.name_suffix, pos_magic=a.pos_magic, neg_magic=a.neg_magic,
        parallel=ParallelConfig(a.ulysses_degree, a.ring_degree, a.tensor_parallel_degree,
                                2 if a.cfg_parallel else 1),
        parallel_backend=a.parallel_backend, attn_backend=a.attn_backend, device=a.device,
        dtype=a.dtype, denoise_filter=not a.no_denoise_filter, crop_540p=not a.no_crop,
        preset=a.preset, compile=a.compile)


# --- checks before expensive work -----------------------------------------------------------------

def resolve_device(name: str, world_size: int = 1) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PreflightError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if name.startswith("cuda:") and world_size > 1:
        raise PreflightError(f"--device {name} would put all {world_size} ranks on one GPU; pass "
                             "--device cuda (each rank takes its LOCAL_RANK) and choose GPUs with "
                             "CUDA_VISIBLE_DEVICES")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def transformer_dir(req: GenerationRequest) -> str:
    from .layout import TRANSFORMER, part_dir

    return part_dir(TRANSFORMER, req.transformer_dir or req.model_dir)


def check_request(req: GenerationRequest, world_size: int):
    """Degrees and the checkpoint directory (the same on every rank); returns the DiTConfig."""
    from .layout import TRANSFORMER, check_part
    from .modules.model import DiTConfig

    if req.infer_steps < 1:
        raise PreflightError(f"--infer_steps must be >= 1, got {req.infer_steps}")
    if not os.path.isdir(req.model_dir):
        raise PreflightError(f"--model_dir {req.model_dir} does not exist; download the weights with "
                             "`python -m stepvideo.download DIR` or write the tiny model with "
                             "`python -m stepvideo.tiny DIR`")
    tdir = transformer_dir(req)
    try:
        check_part(TRANSFORMER, tdir)
        cfg = DiTConfig.from_dict(read_json(os.path.join(tdir, TRANSFORMER.config), "DiT config"))
        req.parallel.validate(world_size, cfg.num_attention_heads)
    except (CheckpointError, ValueError, TypeError) as e:
        raise PreflightError(str(e)) from e
    return cfg


def check_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PreflightError(f"--save_path {directory} is not writable ({e.strerror}); choose another "
                             "directory") from e


def check_services(req: GenerationRequest, wait_s: float = 900.0) -> None:
    """Both services answer /health; one still loading its models is waited for."""
    from .service.client import RemoteTextEncoder, RemoteVAE, ServiceError

    for flag, client in (("caption_url", RemoteTextEncoder(req.caption_url)),
                         ("vae_url", RemoteVAE(req.vae_url))):
        try:
            if client.health().get("status") != "ready":
                client.wait_ready(timeout=wait_s)
        except (ServiceError, ValueError) as e:
            raise PreflightError(
                f"{e}. Start it with `python api/call_remote_server.py --model_dir "
                f"{req.model_dir}` and pass its address with --{flag}") from e


# --- the job ------------------------------------------------------------------------------------

def output_stem(req: GenerationRequest) -> str:
    """``<save_path>/<first 50 chars of the prompt>-<8 hex of its SHA-1>-seed<seed><suffix>``: the
    hash keeps prompts that share their first 50 characters apart."""
    slug = re.sub(r"[^\w\-]+", "_", req.prompt.strip(), flags=re.UNICODE).strip("_")[:50] or "video"
    digest = hashlib.sha1(req.prompt.encode("utf-8")).hexdigest()[:8]
    return os.path.join(req.save_path, f"{slug}-{digest}-seed{req.seed}{req.name_suffix}")


def broadcast_text(text: TextEmbeddings | None, ctx: ParallelContext, device, dtype) -> TextEmbeddings:
    """Rank 0's embeddings on every rank (shapes first, then the tensors; no pickling)."""
    if ctx.world_size == 1:
        return text.to(device, dtype)
    shapes = [*text.y.shape, *text.clip.shape[1:]] if ctx.is_main else None
    n, ly, dy, lc, dc = ctx.broadcast_ints(shapes, device)
    if not ctx.is_main:
        text = TextEmbeddings(torch.empty(n, ly, dy), torch.empty(n, lc + ly), torch.empty(n, lc, dc))
    parts = [ctx.broadcast_tensor(t.float(), device) for t in (text.y, text.mask, text.clip)]
    return TextEmbeddings(*parts).to(device, dtype)


class VideoGenerator:
    """One loaded DiT on this rank, generating videos for requests that share the model flags."""

    def __init__(self, req: GenerationRequest):
        from .modules.attention import set_backend

        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.cfg = check_request(req, world)  # the same answer on every rank
        self.device = resolve_device(req.device, world)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(req.dtype, self.device)
        set_backend(req.attn_backend)
        self.ctx = setup_parallel(req.parallel, self.cfg.num_attention_heads, req.parallel_backend,
                                  self.device)
        self._rank0_checks(req)
        t0 = time.perf_counter()
        self.pipe = StepVideoPipeline(self._load(req), load_scheduler(req.model_dir))
        self.load_seconds = time.perf_counter() - t0
        self.text_encoder = self.vae = None
        if self.ctx.is_main:
            from .service.client import RemoteTextEncoder, RemoteVAE

            self.text_encoder = RemoteTextEncoder(req.caption_url)
            self.vae = RemoteVAE(req.vae_url)

    def _rank0_checks(self, req: GenerationRequest) -> None:
        """Output directory and services, checked by rank 0 once the groups exist; every rank
        learns the outcome, so all stop together with rank 0's one-line message."""
        problem = None
        if self.ctx.is_main:
            try:
                check_writable(req.save_path)
                check_services(req)
            except PreflightError as e:
                problem = e
        failed = self.ctx.broadcast_ints([int(problem is not None)] if self.ctx.is_main else None,
                                         self.device)[0]
        if failed:
            raise problem or PreflightError("rank 0 reported a failed check")

    def _load(self, req: GenerationRequest):
        """The DiT on this rank's device; with tensor parallelism each rank keeps only its slice
        (loaded on the CPU, sliced, then moved), so peak device memory is the slice."""
        from .modules.model import StepVideoModel

        tp = req.parallel.tensor_parallel_degree > 1
        model = StepVideoModel.from_pretrained(transformer_dir(req), self.dtype,
                                               "cpu" if tp else self.device)
        self.ctx.apply(model)
        model = model.to(self.device) if tp else model
        if req.compile:
            model.compile_blocks()
        return model

    def encode_text(self, req: GenerationRequest) -> TextEmbeddings:
        """Rank 0: [prompt + pos_magic, neg_magic] through the caption service."""
        return self.text_encoder.encode(cfg_prompts([req.prompt], req.pos_magic, req.neg_magic))

    @torch.inference_mode()
    def generate(self, req: GenerationRequest, progress: bool = True,
                 text: TextEmbeddings | None = None, text_seconds: float = 0.0) -> dict | None:
        """Run one request; rank 0 returns the record written to the sidecar, other ranks None.

        ``text`` (rank 0) skips the caption call when the caller encoded already, taking
        ``text_seconds``; every rank must call this for the same request.
        """
        times: dict[str, float] = {"load_transformer": self.load_seconds}
        t0 = time.perf_counter()
        if self.ctx.is_main and text is None:
            text = self.encode_text(req)
        text = broadcast_text(text, self.ctx, self.device, self.dtype)
        times["text_encode"] = time.perf_counter() - t0 + text_seconds
        step_times, bar = [], self._progress(req.infer_steps, progress)
        last = [time.perf_counter()]

        def on_step(i, _x):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            if bar is not None:
                bar.set_postfix_str(f"{step_times[-1]:.2f} s/step")
                bar.update(1)

        t0 = time.perf_counter()
        x = self.pipe.sample(text, req.size, req.infer_steps, req.cfg_scale, req.time_shift,
                             seed=req.seed, velocity=self.ctx.velocity or guided_velocity,
                             on_step=on_step)
        times["denoise"] = time.perf_counter() - t0
        times["denoise_step_mean"] = sum(step_times) / len(step_times)
        if bar is not None:
            bar.close()
        if not self.ctx.is_main:
            return None
        return self._write(req, x, times)

    def _progress(self, total: int, enabled: bool):
        if not (enabled and self.ctx.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)

    def _write(self, req: GenerationRequest, x: torch.Tensor, times: dict) -> dict:
        from .video_io import contact_sheet, save_video, stack_batch

        stem = output_stem(req)
        t0 = time.perf_counter()
        frames = stack_batch(self._decode(x.float().cpu(), stem))  # (F, H, W, 3), uint8 on the wire
        times["vae_decode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        paths = {"video": save_video(frames, stem + ".mp4", denoise=req.denoise_filter,
                                     crop=req.crop_540p)}
        if req.contact_sheet:
            paths["contact_sheet"] = contact_sheet(frames, stem + ".png")
        times["write"] = time.perf_counter() - t0
        record = sidecar(req, self.ctx, times, paths, frames.shape)
        paths["sidecar"] = write_json_atomic(stem + ".json", record)
        record["outputs"] = paths
        return record


    def _decode(self, latents: torch.Tensor, stem: str):
        """Decode through the VAE service; if that fails, keep the denoised latents on disk so the
        expensive part is not lost, and say where they are."""
        from .service.client import ServiceError

        try:
            return self.vae.decode_uint8(latents)
        except ServiceError as e:
            from safetensors.torch import save_file

            path = stem + ".latents.safetensors"
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            save_file({"latents": latents.contiguous()}, path)
            raise ServiceError(e.service, e.url, f"{e.server_message}; the denoised latents are saved "
                               f"in {path} (decode them later with RemoteVAE(url).decode_uint8)",
                               e.status) from e


def sidecar(req: GenerationRequest, ctx: ParallelContext, times: dict, paths: dict, frame_shape) -> dict:
    settings = dataclasses.asdict(req)
    settings.pop("parallel")
    return {
        "prompt": req.prompt, "pos_magic": req.pos_magic, "neg_magic": req.neg_magic, "seed": req.seed,
        "settings": settings,
        "degrees": {**dataclasses.asdict(req.parallel), "world_size": ctx.world_size},
        "frames": int(frame_shape[0]), "height": int(frame_shape[1]), "width": int(frame_shape[2]),
        "times_s": {k: round(v, 4) for k, v in times.items()},
        "stepvideo_version": __version__, "torch_version": torch.__version__,
        "model_dir": os.path.abspath(req.model_dir),
        "outputs": {k: os.path.abspath(v) for k, v in paths.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from .service.client import ServiceError

    req = request_from_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if not req.prompt.strip():
            raise PreflightError("--prompt is empty; say what the video should show")
        gen = VideoGenerator(req)
        record = gen.generate(req)
    except PreflightError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except ServiceError as e:  # rank 0 only: the service failed after the checks
        print(f"error: {e}", file=sys.stderr)
        return 3
    if record is not None:
        out = {k: os.path.abspath(v) for k, v in record["outputs"].items()}
        print(f"wrote {out['video']} ({record['frames']} frames, {record['width']}x{record['height']}), "
              f"sidecar {out['sidecar']}" + (f", contact sheet {out['contact_sheet']}"
                                             if "contact_sheet" in out else ""))
    if gen.ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
