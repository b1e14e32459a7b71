"""The torchrun job: flags -> ``GenerationRequest`` -> checks -> denoise on every rank -> decode and
write on rank 0. ``run_parallel.py`` and ``python -m stepvideo.runner`` are thin entries over
``main``; the prompt-suite runner reuses ``VideoGenerator`` to run many prompts with one loaded
model. The flow itself is the pipeline's (``StepVideoPipeline`` stages); this module adds ranks,
broadcasts, checks and output files around it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from . import __version__
from .quant import MODES as QUANT_MODES
from .conditioning import TextEmbeddings
from .devices import DTYPE_CHOICES, dtype_name, resolve_device, resolve_dtype
from .diffusion.cache import MODES as CACHE_MODES, CacheConfig
from .diffusion.scheduler import load_scheduler
from .diffusion.video_pipeline import (DEFAULT_SEED, NEG_MAGIC, POS_MAGIC, PRESETS, StepVideoPipeline,
                                       check_sampling,
                                       VideoSize)
from .fileio import write_json_atomic
from .memory_plan import MemoryOptions, add_memory_args, memory_options
from .modules.attention import NAMES as ATTN_BACKENDS
from .parallel import LaunchEnv, ParallelConfig, setup_parallel
from .timing import peak_rss_bytes
from .vae.local import parse_tile
from .weights import CheckpointError, read_json


LOCAL = "local"   # --caption_url / --vae_url value: run that part in this process


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
    encoder_device: str = "auto"
    encoder_dtype: str = "auto"
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
    cache: CacheConfig = field(default_factory=CacheConfig)
    memory: MemoryOptions = field(default_factory=MemoryOptions)  # --offload, --quantize & co
    vae_tile: str = "auto"
    vae_parallel: bool = False

    @property
    def size(self) -> VideoSize:
        return VideoSize.rounded(self.num_frames, self.height, self.width)

    def cache_settings(self) -> dict:
        """The caching flags by their command-line names (the sidecar's settings)."""
        c = self.cache
        return {"cache": c.mode, "cache_threshold": c.threshold, "cache_warmup": c.warmup,
                "cfg_truncate": c.cfg_truncate, "cfg_truncate_every": c.cfg_every}


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
    g.add_argument("--vae_url", default="127.0.0.1",
                   help=f"VAE service: host, host:port or URL; a comma-separated list spreads the "
                        f"calls over replicas and fails over when one is down; {LOCAL!r} runs the "
                        "VAE in this job (rank 0), no service")
    g.add_argument("--caption_url", default="127.0.0.1",
                   help=f"caption service: host, host:port or URL; a comma-separated list for "
                        f"replicas, as --vae_url; {LOCAL!r} runs Step-1 + CLIP in this job (rank 0), "
                        "no service")
    g.add_argument("--encoder_device", default="auto",
                   help="device of the in-process (local) encoders/VAE; auto = rank 0's DiT device")
    g.add_argument("--vae_tile", default="auto",
                   help="spatial tiles of the in-process VAE decode: auto (only when an untiled "
                        "17-frame chunk would not fit the free memory), off, or N = tile edge in "
                        "latent pixels (16N px, overlap N/4)")
    g.add_argument("--vae_parallel", action="store_true",
                   help=f"with --vae_url {LOCAL}: every rank loads the VAE and decodes its share "
                        "of the chunks (and of their tiles, with --vae_tile) after denoising; rank 0 "
                        "gathers and blends them (the same frames as one rank)")
    g.add_argument("--encoder_dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype of the in-process encoders/VAE (CLIP runs in float32); auto = "
                        "bfloat16 on CUDA, float32 on CPU. The service's default is bfloat16")
    g = p.add_argument_group("parallelism (world size = ulysses x ring x tensor_parallel x cfg)")
    g.add_argument("--ulysses_degree", type=int, default=1, help="sequence-parallel all-to-all degree; must divide 48 heads")
    g.add_argument("--ring_degree", type=int, default=1, help="sequence-parallel ring degree")
    g.add_argument("--tensor_parallel_degree", type=int, default=1, help="shard heads and MLP over this many ranks")
    g.add_argument("--cfg_parallel", action="store_true",
                   help="run the positive and negative halves of CFG on two rank groups")
    g.add_argument("--parallel_backend", choices=["torch", "xfuser"], default="torch",
                   help="torch: torch.distributed (NCCL/gloo); xfuser: xfuser's environment and "
                        "xFuserLongContextAttention, CUDA only (pip install 'stepvideo[xfuser]')")
    g.add_argument("--attn_backend", choices=list(ATTN_BACKENDS), default="auto",
                   help="attention kernel: auto = the fastest exact one installed, timed once at the "
                        "real shapes (CUDA; sdpa on the CPU); sage is 8-bit (not exact)")
    g.add_argument("--quantize", choices=list(QUANT_MODES), default="none",
                   help="DiT block linears: fp8 = dynamic float8 activations+weights, per-row scales "
                        "(torchao, CUDA sm89+); fp8_weight = float8 e4m3 weights with per-channel "
                        "scales, dequantised at use (half the weight memory; DiT blocks and, with "
                        "--caption_url local, Step-1's layers; any device)")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (about 30 s once; on an H200 a 30B step is 9%% "
                        "faster and peaks 11%% lower)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="DiT weights/activations; auto = bfloat16 on CUDA, float32 on CPU")
    add_memory_args(p)
    g = p.add_argument_group("sampling")
    if require_prompt:
        g.add_argument("--prompt", default=None,
                       help="what the video shows (required unless --serve)")
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
    g = p.add_argument_group("fewer DiT evaluations (approximate; off by default; README: caching)")
    g.add_argument("--cache", choices=CACHE_MODES, default="none",
                   help="reuse the DiT blocks' residual on steps where the input changed little: "
                        "teacache (first block's modulated input), first_block (its residual)")
    g.add_argument("--cache_threshold", type=float, default=0.0,
                   help="reuse while the (accumulated) change stays below this; 0 reuses nothing")
    g.add_argument("--cache_warmup", type=int, default=1,
                   help="first steps that always run the DiT (the last step always does too)")
    g.add_argument("--cfg_truncate", type=float, default=None,
                   help="from this fraction of the steps on, run the negative prompt only every "
                        "--cfg_truncate_every steps and reuse its difference in between")
    g.add_argument("--cfg_truncate_every", type=int, default=4,
                   help="with --cfg_truncate: run the negative branch every K-th step")
    g = p.add_argument_group("output")
    g.add_argument("--save_path", default="./results", help="output directory")
    g.add_argument("--name_suffix", default="", help="appended to the output file names")
    g.add_argument("--no_denoise_filter", action="store_true", help="skip ffmpeg's atadenoise")
    g.add_argument("--no_crop", action="store_true", help="keep the full frame (no 540p crop)")
    if require_prompt:
        add_server_args(p)
    return p


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation server (--serve: stepvideo/genserver; the sampling flags "
                             "are the preset of jobs that leave them out)")
    g.add_argument("--serve", action="store_true",
                   help="keep the model loaded and run video jobs sent over HTTP (no --prompt); "
                        "outputs go to <save_path>/jobs/<id>/")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback requires a token")
    g.add_argument("--port", type=int, default=8000, help="port to bind")
    g.add_argument("--max_queue", type=int, default=8, help="queued jobs accepted (429 above)")
    g.add_argument("--token_file", default=None,
                   help="file holding the bearer token (default: $STEPVIDEO_API_TOKEN)")


def parse_args(argv: list[str] | None = None,
               p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """``run_parallel.py``'s flags: ``--prompt`` for one video, or ``--serve`` without it."""
    p = p or build_parser()
    a = p.parse_args(argv)
    if a.serve and a.prompt is not None:
        p.error("--prompt is not used with --serve: submit prompts to the server "
                "(POST /v1/videos or its web page)")
    if not a.serve and a.prompt is None:
        p.error("the following arguments are required: --prompt (or --serve)")
    return a


def request_from_args(argv: list[str] | None = None) -> GenerationRequest:
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        return request_from_namespace(args)
    except ValueError as e:  # a flag value the configs refuse: argparse's one-line error, exit 2
        parser.error(str(e))


def request_from_namespace(a: argparse.Namespace) -> GenerationRequest:
    """The request for parsed flags (presets applied); ``prompt`` is empty when there is none."""
    preset = PRESETS[a.preset]
    return GenerationRequest(
        model_dir=a.model_dir, transformer_dir=a.transformer_dir,
        prompt=getattr(a, "prompt", None) or "",
        vae_url=a.vae_url, caption_url=a.caption_url, encoder_device=a.encoder_device,
        encoder_dtype=a.encoder_dtype,
        infer_steps=preset.num_inference_steps if a.infer_steps is None else a.infer_steps,
        cfg_scale=preset.guidance_scale if a.cfg_scale is None else a.cfg_scale,
        time_shift=preset.time_shift if a.time_shift is None else a.time_shift,
        num_frames=a.num_frames, height=a.height, width=a.width, seed=a.seed,
        save_path=a.save_path, name_suffix=a.name_suffix, pos_magic=a.pos_magic, neg_magic=a.neg_magic,
        parallel=ParallelConfig(a.ulysses_degree, a.ring_degree, a.tensor_parallel_degree,
                                2 if a.cfg_parallel else 1),
        parallel_backend=a.parallel_backend, attn_backend=a.attn_backend, device=a.device,
        dtype=a.dtype, denoise_filter=not a.no_denoise_filter, crop_540p=not a.no_crop,
        preset=a.preset, compile=a.compile, cache=cache_from_namespace(a),
        memory=memory_options(a), vae_tile=a.vae_tile, vae_parallel=a.vae_parallel)


def cache_from_namespace(a: argparse.Namespace) -> CacheConfig:
    return CacheConfig(a.cache, a.cache_threshold, a.cache_warmup, a.cfg_truncate,
                       a.cfg_truncate_every)


# --- checks before expensive work -----------------------------------------------------------------

def transformer_dir(req: GenerationRequest) -> str:
    from .layout import TRANSFORMER, part_dir

    return part_dir(TRANSFORMER, req.transformer_dir or req.model_dir)


def check_request(req: GenerationRequest):
    """Sampling values and the checkpoint directory (the same answer on every rank); returns the
    DiTConfig and notes for the user (rounding, unusual values). The degrees are checked once, by
    ``setup_parallel``."""
    from .layout import TRANSFORMER, check_part
    from .modules.model import DiTConfig

    try:
        notes = check_sampling(req.infer_steps, req.cfg_scale, req.time_shift, req.num_frames,
                               req.height, req.width)
        parse_tile(req.vae_tile)
    except ValueError as e:
        raise PreflightError(str(e)) from e
    if req.vae_parallel and req.vae_url != LOCAL:
        raise PreflightError(f"--vae_parallel decodes on the job's ranks: it needs --vae_url {LOCAL}")
    if req.cache.mode == "none" and req.cache.threshold > 0:
        notes.append(f"--cache_threshold {req.cache.threshold} has no effect without --cache "
                     "teacache or --cache first_block")
    if not os.path.isdir(req.model_dir):
        raise PreflightError(f"--model_dir {req.model_dir} does not exist; download the weights with "
                             "`python -m stepvideo.download DIR` or write the tiny model with "
                             "`python -m stepvideo.tiny DIR`")
    tdir = transformer_dir(req)
    try:
        if local_parts(req):
            local_part_dirs(req)
        if req.encoder_device != "auto":
            resolve_device(req.encoder_device)
        check_part(TRANSFORMER, tdir)
        cfg = DiTConfig.from_dict(read_json(os.path.join(tdir, TRANSFORMER.config), "DiT config"))
    except (CheckpointError, ValueError, TypeError) as e:
        raise PreflightError(str(e)) from e
    return cfg, notes


def local_parts(req: GenerationRequest) -> list[str]:
    """The model parts this job runs in-process (``--caption_url local``, ``--vae_url local``)."""
    from .layout import HUNYUAN_CLIP, STEP_LLM, VAE

    return ([STEP_LLM.folder, HUNYUAN_CLIP.folder] if req.caption_url == LOCAL else []) + \
        ([VAE.folder] if req.vae_url == LOCAL else [])


def local_part_dirs(req: GenerationRequest) -> dict[str, str]:
    """Directories of the in-process parts; a CheckpointError lists every missing file."""
    from .layout import check_model_dir

    return check_model_dir(req.model_dir, local_parts(req))


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
    """Both services answer /health (with replicas: at least one of each); one still loading its
    models is waited for."""
    from .service import replicas
    from .service.client import ServiceError

    for flag, make, url in (("caption_url", replicas.text_encoder, req.caption_url),
                            ("vae_url", replicas.vae, req.vae_url)):
        if url == LOCAL:
            continue
        try:
            client = make(url)
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


class VideoGenerator:
    """One loaded DiT on this rank, generating videos for requests that share the model flags."""

    def __init__(self, req: GenerationRequest, env: LaunchEnv | None = None):
        from .modules.attention import probe_kernel, set_backend
        from .quant import check_mode as check_quantize

        env = env or LaunchEnv.from_environ()
        self.cfg, notes = check_request(req)  # the same answer on every rank
        try:
            self.device = resolve_device(req.device, env.local_rank, env.world_size)
            self.dtype = resolve_dtype(req.dtype, self.device)
            set_backend(req.attn_backend)
            check_quantize(req.memory.quantize, self.device, req.parallel.tensor_parallel_degree)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.ctx = setup_parallel(req.parallel, self.cfg.num_attention_heads,
                                      req.parallel_backend, self.device, env)
            self.attn_backend = probe_kernel(self.device, self.dtype,
                                             head_dim=self.cfg.attention_head_dim)
        except (ValueError, RuntimeError) as e:
            raise PreflightError(str(e)) from e
        if self.ctx.is_main:
            if req.prompt:
                from .text_encoder.local import prompt_length_notes

                notes += prompt_length_notes(req.model_dir, req.prompt + req.pos_magic)
            for note in [*notes, *self.ctx.notes]:
                print(f"note: {note}", file=sys.stderr)
        self._rank0_checks(req)
        self.memory = self._plan_memory(req)
        t0 = time.perf_counter()
        self.pipe = StepVideoPipeline(self._load(req), load_scheduler(req.model_dir))
        self.load_seconds = time.perf_counter() - t0
        self.load_times = {"load_transformer": self.load_seconds}
        if self.ctx.is_main or req.vae_parallel:
            self._attach_backends(req)
        self.pipe.place(self.memory.offload, self.device, encoders=self._encoders_here(req))

    def _encoders_here(self, req: GenerationRequest) -> bool:
        return req.encoder_device == "auto" or resolve_device(req.encoder_device) == self.device

    def _plan_memory(self, req: GenerationRequest) -> MemoryOptions:
        """``--offload auto`` resolved, any mode checked against the device's free memory before a
        weight is loaded (CUDA; on the CPU every mode runs as it is asked)."""
        from .memory_plan import PlanError, plan_request

        try:
            resolved, plan = plan_request(req, self.cfg, self.device)
        except (PlanError, RuntimeError) as e:
            raise PreflightError(str(e)) from e
        if plan is not None and self.ctx.is_main:
            print(f"memory plan: {plan.describe()}", file=sys.stderr)
        return resolved

    def _attach_backends(self, req: GenerationRequest) -> None:
        """Rank 0's text encoder and VAE: the service's clients, or the models in this process.
        With ``--vae_parallel`` the other ranks load only the VAE, on their own device."""
        from .service import replicas

        device = self.device if req.encoder_device == "auto" else resolve_device(req.encoder_device)
        dtype = resolve_dtype(req.encoder_dtype, device)
        if self.memory.offloaded and self._encoders_here(req):
            device = torch.device("cpu")  # the residency plan moves them to the GPU per stage
        vae_device = self.device if req.vae_parallel else device  # parallel: each rank's own GPU
        dirs = local_part_dirs(req)
        t0 = time.perf_counter()
        if not self.ctx.is_main:  # --vae_parallel
            from .vae.local import LocalVAE

            self.pipe.vae = LocalVAE.from_dir(dirs["vae"], resolve_dtype(req.encoder_dtype, vae_device),
                                              vae_device, tile=req.vae_tile)
            return
        if req.caption_url == LOCAL:
            from .text_encoder.local import LocalTextEncoder

            self.pipe.text_encoder = LocalTextEncoder.from_dirs(
                dirs["step_llm"], dirs["hunyuan_clip"], dtype, device, cache_size=64)
            if self.memory.quantize == "fp8_weight":
                from .quant import quantize_step1

                quantize_step1(self.pipe.text_encoder.llm.model)
        else:
            self.pipe.text_encoder = replicas.text_encoder(req.caption_url)
        if req.vae_url == LOCAL:
            from .vae.local import LocalVAE

            self.pipe.vae = LocalVAE.from_dir(dirs["vae"], resolve_dtype(req.encoder_dtype, vae_device),
                                              vae_device, tile=req.vae_tile)
        else:
            self.pipe.vae = replicas.vae(req.vae_url)
        if local_parts(req):
            self.load_times["load_local_models"] = time.perf_counter() - t0

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
        # Sliced, weight-quantised or offloaded: load on the host; the pipeline's residency plan
        # (StepVideoPipeline.place) moves it, so the device never holds the whole bf16 model.
        # Dynamic fp8 quantises on the device (torchao's float8 kernels are CUDA-only).
        on_host = tp or self.memory.offloaded or self.memory.quantize == "fp8_weight"
        model = StepVideoModel.from_pretrained(transformer_dir(req), self.dtype,
                                               "cpu" if on_host else self.device)
        self.ctx.apply(model)
        self.memory.apply(model)
        if req.compile:
            model.compile_blocks()
        return model

    def encode_text(self, req: GenerationRequest) -> TextEmbeddings:
        """Rank 0: [prompt + pos_magic, neg_magic] through the pipeline's text encoder."""
        self.pipe.times = {}
        return self.pipe.encode_prompt([req.prompt], req.pos_magic, req.neg_magic)

    @torch.inference_mode()
    def generate(self, req: GenerationRequest, progress: bool = True,
                 text: TextEmbeddings | None = None, on_step=None) -> dict | None:
        """Run one request; rank 0 returns the record written to the sidecar, other ranks None.

        ``text`` (rank 0) skips the caption call when the caller encoded already with
        ``encode_text`` (whose time the pipeline kept); every rank calls this for the same request.
        ``on_step(i, latents)`` runs after every denoising step on every rank.
        """
        pipe = self.pipe
        if text is None and self.ctx.is_main:
            text = self.encode_text(req)
        text = self.ctx.broadcast_text(text, self.device, self.dtype)
        x = pipe.sample(text, req.size, req.infer_steps, req.cfg_scale, req.time_shift,
                        seed=req.seed, cfg=self.ctx.cfg, progress=progress and self.ctx.is_main,
                        cache=req.cache, reduce=functools.partial(self.ctx.all_reduce_sum,
                                                                  device=self.device),
                        on_step=on_step)
        if req.vae_parallel:
            x = self.ctx.broadcast_tensor(x.float().contiguous(), self.device).float().cpu()
            pieces = pipe.vae.iter_uint8_shared(x, self.ctx, self.device)
            if not self.ctx.is_main:
                for _ in pieces:  # this rank's share; rank 0 gathers and writes
                    pass
                return None
        elif not self.ctx.is_main:
            return None
        else:
            pieces = pipe.uint8_pieces(x)
        stem = output_stem(req)
        paths, shape = self._write(x, pieces, stem, req)
        times = {**self.load_times, **pipe.times}
        record = sidecar(req, self, times, paths, shape, pipe.cache_stats)
        paths["sidecar"] = write_json_atomic(stem + ".json", record)
        record["outputs"] = paths
        return record

    def _write(self, latents: torch.Tensor, pieces, stem: str, req: GenerationRequest):
        """Decode and write, streamed (``pipe.write_stream``); if the VAE service fails, keep the
        denoised latents on disk so the expensive part is not lost, and say where they are."""
        from .service.client import ServiceError

        try:
            return self.pipe.write_stream(pieces, stem, req.size.decoded_frames, req.denoise_filter,
                                          req.crop_540p, req.contact_sheet)
        except ServiceError as e:
            from safetensors.torch import save_file

            path = stem + ".latents.safetensors"
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            save_file({"latents": latents.float().cpu().contiguous()}, path)
            raise ServiceError(e.service, e.url, f"{e.server_message}; the denoised latents are saved "
                               f"in {path} (decode them later with RemoteVAE(url).decode_uint8)",
                               e.status) from e

    def close(self) -> None:
        self.ctx.close()


def sidecar(req: GenerationRequest, gen: VideoGenerator, times: dict, paths: dict,
            frame_shape, cache_stats: dict | None = None) -> dict:
    """The JSON written next to the video: what was asked, what actually ran (``cache``: DiT
    evaluations and reused steps), and how long."""
    from .modules.attention import auto_choices

    settings = dataclasses.asdict(req)
    settings.pop("parallel")
    settings.pop("cache")
    settings.update(req.cache_settings())
    settings["quantize"] = req.memory.quantize  # the one memory option that changes the video
    return {
        "prompt": req.prompt, "pos_magic": req.pos_magic, "neg_magic": req.neg_magic, "seed": req.seed,
        "settings": settings,
        "resolved": {"device": str(gen.device), "dtype": dtype_name(gen.dtype),
                     "attn_backend": gen.attn_backend, "attn_auto_choices": auto_choices(),
                     "memory": dataclasses.asdict(gen.memory),
                     "peak_host_rss_gib": round(peak_rss_bytes() / 2**30, 2)},
        "degrees": {**dataclasses.asdict(req.parallel), "world_size": gen.ctx.world_size},
        "frames": int(frame_shape[0]), "height": int(frame_shape[1]), "width": int(frame_shape[2]),
        "times_s": {k: round(v, 4) for k, v in times.items()},
        "cache": cache_stats,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stepvideo_version": __version__, "torch_version": torch.__version__,
        "model_dir": os.path.abspath(req.model_dir),
        "outputs": {k: os.path.abspath(v) for k, v in paths.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a problem found before the expensive work, 3 the service failed
    afterwards, 130 interrupted (Ctrl-C). Under torchrun, the launcher's own exit code wraps these."""
    from .service.client import ServiceError

    a = parse_args(argv)
    req = request_from_namespace(a)
    env = LaunchEnv.from_environ()
    gen = None
    try:
        if a.serve:
            return serve(req, a, env)
        if not req.prompt.strip():
            raise PreflightError("--prompt is empty; say what the video should show")
        gen = VideoGenerator(req, env)
        record = gen.generate(req)
    except PreflightError as e:
        if env.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except ServiceError as e:  # rank 0 only: the service failed after the checks
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if env.rank == 0:
            print("\ninterrupted: " + ("server stopped" if a.serve else "no video written"),
                  file=sys.stderr)
        return 130
    if record is not None:
        out = {k: os.path.abspath(v) for k, v in record["outputs"].items()}
        print(f"wrote {out['video']} ({record['frames']} frames, {record['width']}x{record['height']}), "
              f"sidecar {out['sidecar']}" + (f", contact sheet {out['contact_sheet']}"
                                             if "contact_sheet" in out else ""))
    gen.close()
    return 0


def serve(req: GenerationRequest, a: argparse.Namespace, env: LaunchEnv) -> int:
    """``--serve``: the bind and token checked, the model loaded once, then jobs until stopped."""
    from .genserver.loop import BindError, ServeOptions, serve as serve_jobs

    try:
        opts = ServeOptions.checked(req.model_dir, a.host, a.port, a.token_file, a.max_queue)
    except ValueError as e:
        raise PreflightError(str(e)) from e
    gen = VideoGenerator(req, env)
    try:
        serve_jobs(gen, req, opts)
    except BindError as e:   # every rank hears it
        raise PreflightError(str(e)) from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
