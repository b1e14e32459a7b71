"""Text -> latents -> video: sizes, seeded noise, the CFG denoising loop and the pipeline object.

The pipeline owns the flow (encode -> noise -> denoise -> decode -> write) and times its own
stages; the torchrun runner adds ranks, broadcasts and output files around the same methods, and
the benchmarks time them. Text encoding and VAE decoding sit behind two small interfaces
(``stepvideo.conditioning``), so the same flow runs against the HTTP service or in-process models.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..conditioning import TextEmbeddings, TextEncoderBackend, VAEBackend
from ..offload import OffloadConfig, Residency
from ..vae.vae import FRAMES_PER_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR, decoded_frames
from .cache import CacheConfig, StepCache, stats_record
from .scheduler import FlowMatchDiscreteScheduler, cfg_combine, load_scheduler

POS_MAGIC = ("超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、"
             "自然、生动、超细节、清晰。")
NEG_MAGIC = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"
DEFAULT_SEED = 67280421310721


@dataclass(frozen=True)
class SamplingPreset:
    """Sampling defaults of a checkpoint family."""

    num_inference_steps: int = 50
    guidance_scale: float = 9.0
    time_shift: float = 13.0
    num_frames: int = 204
    height: int = 544
    width: int = 992


PRESETS = {
    "base": SamplingPreset(),
    "turbo": SamplingPreset(num_inference_steps=15, guidance_scale=5.0, time_shift=17.0),
}


@dataclass(frozen=True)
class VideoSize:
    """Frames and pixels after the release's rounding, and the matching latent shape."""

    num_frames: int
    height: int
    width: int

    @classmethod
    def rounded(cls, num_frames: int, height: int, width: int) -> "VideoSize":
        """Frames down to a multiple of 17 (at least 1), height/width down to multiples of 16."""
        if min(num_frames, height, width) < 1:
            raise ValueError(f"num_frames, height and width must be positive, got "
                             f"{num_frames}, {height}, {width}")
        return cls(max(num_frames // FRAMES_PER_CHUNK * FRAMES_PER_CHUNK, 1),
                   max(height // SPATIAL_FACTOR * SPATIAL_FACTOR, 16),
                   max(width // SPATIAL_FACTOR * SPATIAL_FACTOR, 16))

    @classmethod
    def checked(cls, num_frames: int, height: int, width: int) -> tuple["VideoSize", list[str]]:
        """``rounded``, refusing what cannot be decoded, with a note for each value it changed.

        As in the release, fewer than 17 frames means one latent frame, decoded to one frame (an
        image). ValueError below one latent pixel (16 px) or for a non-positive frame count."""
        if num_frames < 1:
            raise ValueError(f"--num_frames {num_frames} must be >= 1 (1-16: one image; 17, 34, "
                             "... up to 204: a video)")
        for flag, value in (("height", height), ("width", width)):
            if value < SPATIAL_FACTOR:
                raise ValueError(f"--{flag} {value} is below {SPATIAL_FACTOR} pixels (one latent "
                                 f"pixel); use a multiple of {SPATIAL_FACTOR}, e.g. 544x992")
        size = cls.rounded(num_frames, height, width)
        notes = [f"--{flag} {asked} rounded down to {got} (a multiple of {step})"
                 for flag, asked, got, step in (
                     ("num_frames", num_frames, size.num_frames, FRAMES_PER_CHUNK),
                     ("height", height, size.height, SPATIAL_FACTOR),
                     ("width", width, size.width, SPATIAL_FACTOR)) if asked != got]
        if size.num_frames == 1:
            notes = [n for n in notes if not n.startswith("--num_frames")]
            notes.insert(0, f"--num_frames {num_frames} is below {FRAMES_PER_CHUNK}: one latent "
                            "frame, decoded to a single image (the release's image mode; written "
                            "as a 1-frame mp4 and a .png)")
        return size, notes

    def latent_shape(self, batch: int, channels: int) -> tuple[int, int, int, int, int]:
        frames = max(self.num_frames // FRAMES_PER_CHUNK * LATENTS_PER_CHUNK, 1)
        return (batch, frames, channels, self.height // SPATIAL_FACTOR,
                self.width // SPATIAL_FACTOR)

    @property
    def decoded_frames(self) -> int:
        """Frames the VAE decodes the latents of this size to (``num_frames`` after rounding)."""
        return decoded_frames(self.latent_shape(1, 1)[1])


def check_sampling(num_inference_steps: int, guidance_scale: float, time_shift: float,
                   num_frames: int, height: int, width: int) -> list[str]:
    """The sampling values of one video, checked before any model runs: ValueError for what
    cannot run, and notes for what was rounded or is unusual. Messages name the CLI flags; the
    generation server renames them to its fields."""
    if num_inference_steps < 1:
        raise ValueError(f"--infer_steps must be >= 1, got {num_inference_steps}")
    if time_shift <= 0:
        raise ValueError(f"--time_shift must be > 0, got {time_shift}")
    _, notes = VideoSize.checked(num_frames, height, width)
    if guidance_scale < 0:
        notes.append(f"--cfg_scale {guidance_scale} is negative: guidance pushes away from the "
                     "prompt (the release uses 9.0, Turbo 5.0)")
    return notes


def initial_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise from a CPU generator seeded with ``seed``: identical on every rank and
    device. Rounded through ``dtype`` (the transformer's) as the release's bf16 noise is."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).float()


def cfg_prompts(prompts: list[str], pos_magic: str, neg_magic: str) -> list[str]:
    """The text batch [p1+pos, ..., pB+pos, neg, ..., neg]: positives first, then negatives."""
    return [p + pos_magic for p in prompts] + [neg_magic] * len(prompts)


def guided_velocity(transformer, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings,
                    guidance: float, cfg=None) -> torch.Tensor:
    """One CFG prediction: the transformer sees [x, x] against [positive, negative] text.

    ``cfg`` (a ``parallel.CfgSplit``) makes this rank run only its half of the batch and collect
    the other half's velocity afterwards; without it both halves run here. Either way the halves
    are combined here, once.

    The timestep stays float32 whatever the transformer's dtype. The public release casts it to
    bf16 first (t = 0.3 becomes 0.30078, i.e. timestep 300.8 instead of 300 after the x1000); on the
    kit's DiT in bf16 that rounding alone moves the output by 0.61, against 0.027 for everything
    else bf16 does (measured on CPU, benchmark notes in README).
    """
    if cfg is not None:
        text = cfg.local(text)
    dtype = next(transformer.parameters()).dtype
    copies = text.y.shape[0] // x.shape[0]  # 2: [x, x] for both halves; 1: this rank's half
    xx = torch.cat([x] * copies).to(dtype)
    v = transformer(xx, t.expand(xx.shape[0]).float(), text.y, text.clip, text.mask,
                    return_dict=False).float()
    if cfg is not None:
        v = cfg.gather(v)
    v_pos, v_neg = v.chunk(2)
    return cfg_combine(v_pos, v_neg, guidance)


def denoise(transformer, latents: torch.Tensor, text: TextEmbeddings,
            scheduler: FlowMatchDiscreteScheduler, guidance: float, cfg=None,
            on_step: Callable[[int, torch.Tensor], None] | None = None,
            cache: StepCache | None = None) -> torch.Tensor:
    """Run the Euler loop over ``scheduler.timesteps``; latents stay float32 between steps.
    ``cache`` (``diffusion.cache.StepCache``) decides per step what to run and what to reuse."""
    x = latents.float()
    for i, t in enumerate(scheduler.timesteps):
        if cache is None:
            v = guided_velocity(transformer, x, t, text, guidance, cfg)
        else:
            v = cache.velocity(transformer, i, x, t, text, guidance, cfg)
        x = scheduler.step(v, t, x)
        if on_step is not None:
            on_step(i, x)
    return x


class StepProgress:
    """A tqdm bar over the denoising steps with the last step's seconds (CUDA synchronised, so the
    time is the step's own) and ``note(steps done)`` if given; a no-op when disabled."""

    def __init__(self, total: int, device: torch.device, enabled: bool = True,
                 note: Callable[[int], str] | None = None):
        self.device, self.step_times, self.note = device, [], note
        self._last = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)

    def __call__(self, i: int, x: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.step_times.append(now - self._last)
        self._last = now
        if self.bar is not None:
            note = f", {self.note(i + 1)}" if self.note is not None else ""
            self.bar.set_postfix_str(f"{self.step_times[-1]:.2f} s/step{note}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepVideoPipeline:
    """Prompt -> video with the public release's call form.

    The stages are methods (``encode_prompt``, ``initial_latents``, ``sample``, ``decode_uint8``,
    ``write``) and each records its wall time in ``self.times`` (seconds, by stage name).
    ``sample`` records in ``self.cache_stats`` how many DiT evaluations ran and which steps were
    reused (``diffusion.cache.stats_record``).
    """

    def __init__(self, transformer, scheduler: FlowMatchDiscreteScheduler | None = None,
                 text_encoder: TextEncoderBackend | None = None, vae: VAEBackend | None = None):
        self.transformer = transformer
        self.scheduler = scheduler or FlowMatchDiscreteScheduler()
        self.text_encoder = text_encoder
        self.vae = vae
        self.times: dict[str, float] = {}
        self.cache_stats: dict | None = None
        self.residency: Residency | None = None

    def place(self, offload: OffloadConfig, device: str | torch.device,
              encoders: bool = True) -> "StepVideoPipeline":
        """Put the models under a residency plan on ``device`` (``--offload``): the DiT and, with
        ``encoders``, the in-process text encoders and VAE (backends with ``residency_parts``).
        Each stage then has its model on the device only while it runs (``none``: always).
        A second call replaces the first plan."""
        if self.residency is not None:
            self.residency.close()
        self.residency = Residency(offload, device)
        self.residency.add("dit", self.transformer, self.transformer.transformer_blocks)
        for backend in (self.text_encoder, self.vae) if encoders else ():
            for name, module, blocks in getattr(backend, "residency_parts", lambda: [])():
                self.residency.add(name, module, blocks)
        return self

    def _resident(self, *names: str):
        return self.residency.active(*names) if self.residency is not None else contextlib.nullcontext()

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        transformer_dir: str | None = None) -> "StepVideoPipeline":
        from ..modules.model import StepVideoModel

        transformer = StepVideoModel.from_pretrained(transformer_dir or model_dir, dtype, device)
        return cls(transformer, load_scheduler(model_dir))

    def setup_api(self, vae_url: str, caption_url: str, token: str | None = None) -> "StepVideoPipeline":
        """Use the caption/VAE service for text encoding and decoding (the release's call form).
        Either URL may be a comma-separated list of replicas (``stepvideo.service.replicas``).
        The one place the diffusion layer reaches up to the service client, at call time."""
        from ..service.replicas import text_encoder, vae

        self.text_encoder = text_encoder(caption_url, token=token)
        self.vae = vae(vae_url, token=token)
        return self

    @property
    def device(self) -> torch.device:
        """The compute device: the residency plan's, else where the DiT's weights are."""
        if self.residency is not None:
            return self.residency.device
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` in ``self.times`` (CUDA work included)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] = time.perf_counter() - start

    # --- the stages ------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], pos_magic: str, neg_magic: str) -> TextEmbeddings:
        """[prompts + pos_magic, neg_magic ...] -> embeddings on the DiT's device and dtype."""
        if self.text_encoder is None:
            raise RuntimeError("no text encoder: call setup_api(vae_url, caption_url) or pass "
                               "text_encoder= to the pipeline")
        with self.stage("text_encode"), self._resident("step_llm", "clip"):
            text = self.text_encoder.encode(cfg_prompts(prompts, pos_magic, neg_magic))
            return text.to(self.device, self.dtype)

    def initial_latents(self, batch: int, size: VideoSize, seed: int = DEFAULT_SEED,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise of the latent shape for ``size``: from ``seed`` (the same on every rank and
        device), or from the caller's ``generator`` (on its own device) when one is given."""
        shape = size.latent_shape(batch, self.transformer.config.in_channels)
        if generator is not None:
            return torch.randn(shape, generator=generator, dtype=torch.float32,
                               device=generator.device).to(self.dtype)
        return initial_noise(shape, seed, self.dtype)

    @torch.inference_mode()
    def sample(self, text: TextEmbeddings, size: VideoSize, num_inference_steps: int,
               guidance_scale: float, time_shift: float, seed: int = DEFAULT_SEED,
               latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
               cfg=None, progress: bool = True,
               on_step: Callable[[int, torch.Tensor], None] | None = None,
               cache: CacheConfig | None = None, reduce=None) -> torch.Tensor:
        """Text embeddings [positives, negatives] -> denoised float32 latents (B, f, C, h, w).

        ``cfg``: this rank's ``parallel.CfgSplit`` under CFG parallelism. ``progress``: a tqdm bar
        with seconds per step; ``self.times["denoise_step_mean"]`` is their mean. ``cache``: step
        caching / CFG truncation (off by default); ``reduce`` sums its distances over the ranks
        (``ParallelContext.all_reduce_sum``)."""
        if latents is None:
            latents = self.initial_latents(text.y.shape[0] // 2, size, seed, generator)
        self.scheduler.set_timesteps(num_inference_steps, time_shift, device=self.device)
        cache = cache or CacheConfig()
        step_cache = StepCache(cache, num_inference_steps, reduce) if cache.enabled else None
        note = step_cache.summary if step_cache is not None else None
        bar = StepProgress(num_inference_steps, self.device, progress, note)

        def step(i: int, x: torch.Tensor) -> None:
            bar(i, x)
            if on_step is not None:
                on_step(i, x)

        try:
            with self.stage("denoise"), self._resident("dit"):
                x = denoise(self.transformer, latents.to(self.device), text, self.scheduler,
                            guidance_scale, cfg=cfg, on_step=step, cache=step_cache)
        finally:
            bar.close()
        self.cache_stats = (step_cache.report() if step_cache is not None
                            else stats_record(cache, num_inference_steps))
        self.times["denoise_step_mean"] = sum(bar.step_times) / max(len(bar.step_times), 1)
        return x

    def _vae(self) -> VAEBackend:
        if self.vae is None:
            raise RuntimeError("no VAE: call setup_api(vae_url, caption_url) or pass vae= to the pipeline")
        return self.vae

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Float video (B, F, 3, H, W) in ~[-1, 1]."""
        with self.stage("vae_decode"), self._resident("vae"):
            return self._vae().decode(latents)

    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, F, H, W, 3) uint8 frames, post-processed chunk by chunk by the VAE backend."""
        with self.stage("vae_decode"), self._resident("vae"):
            return self._vae().decode_uint8(latents.float().cpu())

    def uint8_pieces(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """uint8 (B, n, H, W, 3) pieces as the VAE backend decodes them: chunk by chunk from an
        in-process VAE (``iter_uint8``), the whole video at once from the service."""
        vae = self._vae()
        latents = latents.float().cpu()
        with self._resident("vae"):  # the VAE on the device while its pieces are pulled
            if hasattr(vae, "iter_uint8"):
                yield from vae.iter_uint8(latents)
            else:
                yield vae.decode_uint8(latents)

    def write_stream(self, pieces: Iterable[torch.Tensor], stem: str, total_frames: int,
                     denoise_filter: bool = True, crop: bool = True,
                     contact_sheet: bool = True) -> tuple[dict[str, str], tuple[int, int, int]]:
        """Decode and write at once: each uint8 piece (B, n, H, W, 3) goes to the H.264 writer as
        soon as it is decoded, so the video is never whole in memory. Times the pulls as
        ``vae_decode`` and the writes as ``write``. ``total_frames`` picks the contact-sheet
        frames in advance. One frame (image mode) is written as a 1-frame mp4 and ``stem``.png
        holding the frame itself (cropped like the video). Returns (paths, (frames, H, W) per sample)."""
        from ..video_io import (VideoWriter, contact_sheet as write_sheet, crop_540p, save_image,
                                sheet_indices)

        keep = sheet_indices(total_frames) if contact_sheet or total_frames == 1 else []
        self.times["vae_decode"] = self.times["write"] = 0.0
        shape = None
        with VideoWriter(stem + ".mp4", denoise=denoise_filter, crop=crop, keep=keep) as writer:
            pieces = iter(pieces)
            while True:
                with self.stage("pull"):
                    piece = next(pieces, None)
                self.times["vae_decode"] += self.times.pop("pull")
                if piece is None:
                    break
                shape = (0 if shape is None else shape[0]) + piece.shape[1], *piece.shape[2:4]
                with self.stage("push"):
                    writer.write(piece)
                self.times["write"] += self.times.pop("push")
        paths = {"video": writer.path}
        with self.stage("push"):
            if total_frames == 1:
                image = writer.kept[0]
                paths["image"] = save_image(crop_540p(image[None])[0] if crop else image,
                                            stem + ".png")
                if contact_sheet:
                    paths["contact_sheet"] = paths["image"]
            elif contact_sheet:
                paths["contact_sheet"] = write_sheet(np.stack([writer.kept[i] for i in keep]), stem + ".png",
                                                     indices=keep)
        self.times["write"] += self.times.pop("push")
        return paths, shape

    def write(self, frames, stem: str, denoise_filter: bool = True, crop: bool = True,
              contact_sheet: bool = True) -> dict[str, str]:
        """``stem``.mp4 (H.264, 25 fps) and ``stem``.png (contact sheet) from uint8 frames."""
        from ..video_io import contact_sheet as write_sheet, save_video, stack_batch

        with self.stage("write"):
            frames = stack_batch(frames)  # (F, H, W, 3)
            paths = {"video": save_video(frames, stem + ".mp4", denoise=denoise_filter, crop=crop)}
            if contact_sheet:
                paths["contact_sheet"] = write_sheet(frames, stem + ".png")
        return paths

    # --- the release's call form ----------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], height: int = 544, width: int = 992,
                 num_frames: int = 204, num_inference_steps: int = 50, guidance_scale: float = 9.0,
                 time_shift: float = 13.0, neg_magic: str = "", pos_magic: str = "",
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "mp4", output_file_name: str = "", return_dict: bool = True,
                 seed: int = DEFAULT_SEED, progress: bool = True, on_step: Callable | None = None,
                 cache: CacheConfig | None = None):
        """Encode, denoise (with a progress bar), decode and, for ``output_type="mp4"``, write
        ``output_file_name`` (default ``video.mp4``). ``cache``: step caching / CFG truncation."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if output_type not in ("mp4", "latent", "tensor"):
            raise ValueError(f"output_type must be 'mp4', 'latent' or 'tensor', got {output_type!r}")
        self.times = {}
        text = self.encode_prompt(prompts, pos_magic, neg_magic)
        x = self.sample(text, VideoSize.rounded(num_frames, height, width), num_inference_steps,
                        guidance_scale, time_shift, seed=seed, latents=latents, generator=generator,
                        progress=progress, on_step=on_step, cache=cache)
        if output_type == "latent":
            return {"video": x} if return_dict else x
        video = self.vae_decode(x)
        if output_type == "mp4":
            from ..video_io import save_video

            with self.stage("write"):
                path = save_video(video, output_file_name or "video.mp4")
            return {"video": video, "path": path} if return_dict else video
        return {"video": video} if return_dict else video
