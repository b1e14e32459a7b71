"""The memory planner: which ``--offload`` mode fits a device, and the smallest card a run needs.

Pure functions of (free device bytes, model byte sizes, an activation estimate); nothing here
touches a device. Model sizes come from the modules themselves (``sizes_of``: parameter bytes,
on the meta device for the full-size configs), activations from a per-token model of the tensors
the ops allocate, measured on the CPU (``benchmark/perf/activation_rows.py``), cross-checked and
completed with the H200 measurements in ``benchmark/results`` (see ``ActivationModel``), to be
re-checked on GPUs by ``benchmark/one_gpu.py``.

Speed order of the modes (fastest first): ``none`` (everything resident), ``model`` (each model
on the device only during its stage: one host-to-device copy of each model per prompt), ``block``
with N resident DiT blocks, N from 48 down to 0 (each step streams 48 - N blocks; with prefetch
the copies overlap compute, so fewer resident blocks cost little at the full video size).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from .offload import OffloadConfig
from .quant import MODES as QUANTIZE_CHOICES  # the --quantize modes, one table
from .vae.vae import AUTO_TILE_MIN, PRESETS as VAE_PRESETS, SPATIAL_FACTOR, VAEConfig
from .vae.vae import auto_tile_size, decode_peak_bytes

GiB = 1 << 30

# Usable bytes of the common card classes (total memory less ~0.5-1 GiB of CUDA context):
# H100/A100 80 GB, L40S/A6000 48 GB, RTX 4090/A10 24 GB, H200 141 GB.
CARD_CLASSES = (("24 GB", int(23.0 * GiB)), ("48 GB", int(44.5 * GiB)),
                ("80 GB", int(79.0 * GiB)), ("141 GB", int(139.0 * GiB)))


@dataclass(frozen=True)
class ModelSizes:
    """Device bytes of each model part in its storage dtype. ``dit_block``/``llm_layer``: one
    block (all blocks of a model are the same size); ``*_rest``: everything else of that model."""

    dit_rest: int
    dit_block: int
    dit_blocks: int
    llm_rest: int = 0
    llm_layer: int = 0
    llm_layers: int = 0
    clip: int = 0
    vae: int = 0

    @property
    def dit(self) -> int:
        return self.dit_rest + self.dit_blocks * self.dit_block

    @property
    def llm(self) -> int:
        return self.llm_rest + self.llm_layers * self.llm_layer


def _bytes(module: nn.Module, storage_bytes: int | None, fp8_linears: bool) -> int:
    """Parameter and buffer bytes; ``storage_bytes`` overrides the element size (the dtype the
    weights will be loaded in); ``fp8_linears``: nn.Linear weights at 1 byte + a float32 scale per
    output channel (``--quantize fp8_weight``)."""
    total = 0
    for mod in module.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None:
                continue
            if fp8_linears and isinstance(mod, nn.Linear) and name == "weight":
                total += t.numel() + 4 * t.shape[0]
            else:
                total += t.numel() * (storage_bytes or t.element_size())
    return total


def sizes_of(dit, llm=None, clip=None, vae=None, storage_bytes: int | None = 2,
             fp8_dit: bool = False, fp8_llm: bool = False) -> ModelSizes:
    """ModelSizes from the modules (meta-device ones included): the DiT (``StepVideoModel``),
    Step-1 (``Step1Model``), CLIP and the VAE (any ``nn.Module``). CLIP runs in float32 (4 bytes)."""
    blocks = dit.transformer_blocks
    block = _bytes(blocks[0], storage_bytes, fp8_dit)
    sizes = dict(dit_block=block, dit_blocks=len(blocks),
                 dit_rest=_bytes(dit, storage_bytes, False) - _bytes(blocks, storage_bytes, False))
    if llm is not None:
        layers = llm.transformer["layers"]
        sizes.update(llm_layer=_bytes(layers[0], storage_bytes, fp8_llm), llm_layers=len(layers),
                     llm_rest=_bytes(llm, storage_bytes, False) - _bytes(layers, storage_bytes, False))
    if clip is not None:
        sizes["clip"] = _bytes(clip, 4, False)
    if vae is not None:
        sizes["vae"] = _bytes(vae, storage_bytes, False)
    return ModelSizes(**sizes)


@dataclass(frozen=True)
class ActivationModel:
    """Peak activation bytes of the stages.

    DiT, eager: in D-wide rows of the compute dtype per token and sample in flight, per rank
    (its tokens under sequence parallelism, its slices under tensor parallelism). Measured on the
    CPU with the live-tensor meter (``stepvideo.memtrack``: the tensors the ops allocate, the same
    set on a GPU), released width, random weights, 2 blocks, CFG batch 2, 256 and 512 tokens,
    slopes over the two token counts (``benchmark/perf/activation_rows.py``; results in
    ``benchmark/results/cpu_activation_rows*.json``). The peak is the largest of a block's phases:

    - norm + modulation (``norm_rows`` = 3, whole): the block input, its norm, the modulated
      copy (also the final layer's peak, over the whole batch: ``head_rows``);
    - self-attention (``input_rows + attn_rows`` / t = 1 + 4 / t): the block input is whole, the q/k/v
      projection (3; q and k are normed and rotated inside it, a few heads at a time) and the
      attention output (1) are split over the t tensor-parallel ranks (the cross-attention, its
      queries normed in place too, holds less);
    - feed-forward (``whole_rows`` + ``ff_rows`` / t = 2 + 4 / t): the block input and the output
      are whole, the hidden state (4, one copy: GELU runs in place) is split; ``--ff_chunk c``
      keeps c / S of it plus the chunks' concatenation (1 row), so the peak falls to
      self-attention's (6 -> 5 rows unsplit);
    - Ulysses (u > 1, ``input_rows + ulysses_rows`` / t = 1 + 6 / t): the block input, the projection and
      the head-chunk-major send buffers while q, k, v are packed (each sample's receive buffer is
      freed once attended);
    - ring (r > 1, the torch backend all-gathers k and v: ``whole_rows + (3 + 3 r) / t``).

    Measured (bf16 slope rows): local 6.04, ``--ff_chunk 64`` 5.06, ``--cfg_sequential`` 3.54;
    tensor parallel 2 / 4: 4.04 / 3.04; Ulysses 2 / 4: 7.08 / 7.17 (sequential 4.08 / 4.17);
    ring 2 / 4: 11.08 / 17.17; the model: 6, 5, 3.5, 4, 3, 7, 7, 4, 4, 11, 17, plus RoPE's tables
    (0.04). Each sample waiting under ``--cfg_sequential`` holds its rows of x (``held_rows`` =
    1): blocks update the running tokens in place (``DiTBlock(inplace=True)``). Depth adds
    nothing: under no_grad the blocks' tokens are the only state.
    ``rope_bytes``: the cos/sin tables, (S, 128) float32 each, per token, any batch. With tensor
    parallelism over gloo a peak at random holds one more row of one sample (a row-parallel output
    the collective's work object frees on its own thread a moment after the all-reduce returns):
    not modelled, within ``reserve`` at the full video (0.87 GiB).

    Not modelled: terms that do not grow with the video (text context (B, L, D), AdaLN
    modulations (2 x B x 6D), t_emb (B, D): 0.7 MB at L = 16, 10 MB at L = 397); kernel workspaces
    and allocator rounding (``reserve``). Cross-check against the GPU: an H200 (bf16, 75,888 tokens
    x 2, benchmark/results/h200_dit_*) measured 15.1 rows with the forward of that time (15.15 on
    the CPU for that code), so workspaces added < 0.1 row there; the in-place code is not yet
    measured on a GPU. ``rows_compiled``: the H200 ``--compile`` peak with that older code (10.1
    rows); compiled phases are not measured on the CPU (under sequence parallelism the eager
    figure is taken when larger).

    VAE: ``stepvideo.vae.vae.decode_peak_bytes`` (the H200's untiled 544 x 992 chunk scaled by the
    decoded area of the frame or of one tile; the same estimate ``--vae_tile auto`` uses at run time).
    Text: Step-1's 2 x 320 tokens (36.6 GiB peak, H200) less its weights, rounded up.
    """

    norm_rows: float = 3.0
    input_rows: float = 1.0         # the block input, whole in every phase
    whole_rows: float = 2.0         # the block input and a sub-layer's output
    attn_rows: float = 4.0
    ff_rows: float = 4.0
    ulysses_rows: float = 6.0
    head_rows: float = 3.0
    held_rows: float = 1.0
    rows_compiled: float = 10.1
    rope_bytes: int = 2 * 128 * 4
    text: int = int(0.5 * GiB)
    reserve: int = int(1.0 * GiB)   # allocator fragmentation, cuBLAS workspaces

    def block_rows(self, tokens: int, ff_chunk: int = 0, tensor_parallel: int = 1,
                   ulysses: int = 1, ring: int = 1) -> float:
        """Rows per token and sample in flight at a block's peak phase (``tokens``: this rank's)."""
        t = tensor_parallel
        ff = self.ff_rows / t
        if 0 < ff_chunk < tokens:
            ff = ff * ff_chunk / tokens + 1  # the chunks' outputs, then their concatenation
        phases = [self.norm_rows, self.input_rows + self.attn_rows / t, self.whole_rows + ff]
        if ulysses > 1:
            phases.append(self.input_rows + self.ulysses_rows / t)
        if ring > 1:
            phases.append(self.whole_rows + (3 + 3 * ring) / t)
        return max(phases)

    def dit(self, tokens: int, batch: int, dim: int, dtype_bytes: int, sequential: bool,
            ff_chunk: int, compiled: bool, tensor_parallel: int = 1, ulysses: int = 1,
            ring: int = 1) -> int:
        rows = self.block_rows(tokens, ff_chunk, tensor_parallel, ulysses, ring)
        if compiled:
            rows = max(self.rows_compiled, rows) if ulysses * ring > 1 else self.rows_compiled
        in_flight, held = (1, batch - 1) if sequential else (batch, 0)
        per_token = max(rows * in_flight + self.held_rows * held, self.head_rows * batch)
        return int(tokens * dim * dtype_bytes * per_token) + tokens * self.rope_bytes


@dataclass(frozen=True)
class Workload:
    """What the stages run: ``tokens`` per sample (75,888 for 204 x 544 x 992), CFG ``batch``
    (2 per prompt), the exact activation options, and the VAE's frame and ``vae_tile`` (latent
    pixels, None untiled, or "auto": the largest tile that fits, untiled when that fits)."""

    tokens: int = 75_888
    height: int = 544
    width: int = 992
    vae: VAEConfig = VAE_PRESETS["base"]   # the VAE's config (its decoder width scales the decode)
    batch: int = 2
    dim: int = 6144
    dtype_bytes: int = 2
    cfg_sequential: bool = False
    ff_chunk: int = 0
    compiled: bool = False
    tensor_parallel: int = 1        # the DiT's degrees; ``tokens`` is then this rank's share
    ulysses: int = 1
    ring: int = 1
    vae_on_device: bool = True
    text_on_device: bool = True
    vae_tile: int | str | None = None


@dataclass(frozen=True)
class Plan:
    offload: OffloadConfig
    peak: int                       # the largest stage peak, bytes
    stages: dict                    # stage name -> expected peak bytes

    def describe(self) -> str:
        mode = self.offload.mode + (f" (resident_blocks {self.offload.resident_blocks})"
                                    if self.offload.mode == "block" else "")
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.stages.items())
        return f"--offload {mode}: expected peak {self.peak / GiB:.1f} GiB ({parts} GiB)"


class PlanError(ValueError):
    """The request cannot fit the device; the message names the smallest card that fits."""


def vae_activation(work: Workload) -> int:
    """One chunk's decode of the workload's frame with its ``vae_tile`` ("auto": the smallest tile;
    ``plan`` resolves it first)."""
    tile = AUTO_TILE_MIN if work.vae_tile == "auto" else work.vae_tile
    return decode_peak_bytes(work.vae, work.height // SPATIAL_FACTOR, work.width // SPATIAL_FACTOR,
                             work.dtype_bytes, 1, tile)


def stage_peaks(sizes: ModelSizes, work: Workload, offload: OffloadConfig,
                act: ActivationModel = ActivationModel()) -> dict[str, int]:
    """Expected peak device bytes of each stage under ``offload``."""
    dit_act = act.dit(work.tokens, work.batch, work.dim, work.dtype_bytes, work.cfg_sequential,
                      work.ff_chunk, work.compiled, work.tensor_parallel, work.ulysses, work.ring)
    text_w = (sizes.llm + sizes.clip) if work.text_on_device else 0
    vae_w = sizes.vae if work.vae_on_device else 0
    text_act = act.text if work.text_on_device else 0
    vae_act = vae_activation(work) if work.vae_on_device else 0
    if offload.mode == "none":
        resident = sizes.dit + text_w + vae_w
        return {"text": resident + text_act, "dit": resident + dit_act, "vae": resident + vae_act}
    if offload.mode == "model":
        return {"text": text_w + text_act, "dit": sizes.dit + dit_act, "vae": vae_w + vae_act}
    n = min(offload.resident_blocks, sizes.dit_blocks)
    in_flight = min(1 + offload.prefetch, sizes.dit_blocks - n)  # the running block + prefetched
    dit = sizes.dit_rest + (n + in_flight) * sizes.dit_block
    llm_flight = min(offload.resident_blocks, sizes.llm_layers) + min(1 + offload.prefetch,
                                                                       sizes.llm_layers)
    text = (sizes.llm_rest + llm_flight * sizes.llm_layer + sizes.clip) if work.text_on_device else 0
    return {"text": text + text_act, "dit": dit + dit_act, "vae": vae_w + vae_act}


def candidates(sizes: ModelSizes, prefetch: int = 1) -> list[OffloadConfig]:
    """Modes from fastest to slowest."""
    return [OffloadConfig("none"), OffloadConfig("model")] + [
        OffloadConfig("block", n, prefetch) for n in range(sizes.dit_blocks, -1, -1)]


def estimate(sizes: ModelSizes, work: Workload, offload: OffloadConfig,
             act: ActivationModel = ActivationModel()) -> Plan:
    stages = stage_peaks(sizes, work, offload, act)
    return Plan(offload, max(stages.values()) + act.reserve, stages)


def smallest_card(peak: int) -> str:
    for name, usable in CARD_CLASSES:
        if peak <= usable:
            return name
    return f"more than {CARD_CLASSES[-1][0]}"


def resolve_vae_tile(free_bytes: int, sizes: ModelSizes, work: Workload, offload: OffloadConfig,
                     act: ActivationModel = ActivationModel()) -> Workload:
    """``--vae_tile auto`` for a mode: untiled when the VAE stage fits ``free_bytes`` untiled, else
    the largest tile (latent pixels, down to ``AUTO_TILE_MIN``) whose stage fits; the floor when
    none does (the run's VAE applies its own rule to the memory free at decode time)."""
    if work.vae_tile != "auto":
        return work
    untiled = dataclasses.replace(work, vae_tile=None)
    rest = stage_peaks(sizes, untiled, offload, act)["vae"] - vae_activation(untiled)
    tile = auto_tile_size(work.vae, work.height // SPATIAL_FACTOR, work.width // SPATIAL_FACTOR,
                          work.dtype_bytes, free_bytes - act.reserve - rest)
    return dataclasses.replace(work, vae_tile=tile)


def plan(free_bytes: int, sizes: ModelSizes, work: Workload, requested: OffloadConfig,
         act: ActivationModel = ActivationModel()) -> Plan:
    """``requested.mode == "auto"``: the fastest mode that fits ``free_bytes``. Otherwise the
    requested mode, checked. PlanError (one line naming the smallest card) when nothing fits."""
    if requested.mode != "auto":
        options = [requested]
    else:
        options = candidates(sizes, requested.prefetch)
    for option in options:
        p = estimate(sizes, resolve_vae_tile(free_bytes, sizes, work, option, act), option, act)
        if p.peak <= free_bytes:
            return p
    least = min((estimate(sizes, work, o, act) for o in candidates(sizes, requested.prefetch)),
                key=lambda p: p.peak)
    asked = estimate(sizes, work, options[0], act) if requested.mode != "auto" else least
    hints = [h for h, change in (("--cfg_sequential", dict(cfg_sequential=True)),
                                 ("--ff_chunk 8192", dict(ff_chunk=8192)),
                                 ("--vae_tile auto", dict(vae_tile="auto")))
             if estimate(sizes, dataclasses.replace(work, **change), least.offload, act).peak
             < least.peak]
    raise PlanError(
        f"{'--offload ' + requested.mode if requested.mode != 'auto' else 'this run'} needs "
        f"{asked.peak / GiB:.1f} GiB but {free_bytes / GiB:.1f} GiB is free; the smallest card "
        f"for it is {smallest_card(least.peak)} ({least.describe()})"
        + (f"; {' and '.join(hints)} lower{'s' if len(hints) == 1 else ''} the peak" if hints
           else ""))


def workload_for(num_frames: int, height: int, width: int, batch: int = 2, **options) -> Workload:
    """The DiT's tokens for a video size (latent frames x h/16 x w/16, patch 1)."""
    from .diffusion.video_pipeline import VideoSize

    size = VideoSize.rounded(num_frames, height, width)
    shape = size.latent_shape(1, 64)
    return dataclasses.replace(Workload(batch=batch, **options), height=size.height,
                               width=size.width, tokens=shape[1] * shape[3] * shape[4])


# --- the run's options and the runner's entry -----------------------------------------------------



@dataclass(frozen=True)
class MemoryOptions:
    """The one-GPU options of a run: residency (``offload``), the exact activation options and
    weight storage. Everything but ``quantize`` leaves the output bit-identical."""

    offload: OffloadConfig = OffloadConfig()
    cfg_sequential: bool = False
    ff_chunk: int = 0
    quantize: str = "none"

    def __post_init__(self):
        if self.ff_chunk < 0:
            raise ValueError(f"--ff_chunk must be >= 0 tokens, got {self.ff_chunk}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"--quantize {self.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")

    @property
    def offloaded(self) -> bool:
        return self.offload.mode in ("model", "block")

    def apply(self, dit) -> None:
        """Weight storage and activation options on a loaded DiT (before it is placed)."""
        from .quant import quantize_dit

        quantize_dit(dit, self.quantize)
        dit.set_ff_chunk(self.ff_chunk)
        dit.set_batch_chunk(1 if self.cfg_sequential else 0)


def add_memory_args(p) -> None:
    g = p.add_argument_group("one GPU: memory (each option gives the same video, except --quantize)")
    g.add_argument("--offload", choices=("none", "model", "block", "auto"), default="none",
                   help="none: every model stays on the GPU; model: each model on the GPU only "
                        "during its stage (pinned CPU copies); block: also stream the DiT's blocks "
                        "and Step-1's layers one ahead of use; auto: the fastest that fits the free "
                        "memory (printed), or a one-line error naming the card it needs")
    g.add_argument("--resident_blocks", type=_count, default=0,
                   help="--offload block: blocks kept on the GPU (more = faster, more memory)")
    g.add_argument("--cfg_sequential", action="store_true",
                   help="run the CFG halves through each block one after the other: one sample "
                        "in flight (DiT activations 12 -> 7 rows of D per token, measured on CPU)")
    g.add_argument("--ff_chunk", type=_count, default=0,
                   help="run the feed-forward over this many tokens at a time (0: all): its "
                        "(S, 4D) hidden state is never whole, so the eager DiT peak falls from "
                        "the feed-forward's 6 to self-attention's 5 rows of D per token and "
                        "sample (measured on CPU; --compile: not measured)")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def memory_options(a) -> MemoryOptions:
    return MemoryOptions(OffloadConfig(a.offload, a.resident_blocks), a.cfg_sequential,
                         a.ff_chunk, a.quantize)


def request_sizes(req, dit_cfg, storage_bytes: int, text: bool,
                  vae: VAEConfig | None) -> ModelSizes:
    """ModelSizes of a request's models, built on the meta device from their configs (``vae``:
    the VAE's config when it runs on the device, else None); with tensor parallelism the DiT's
    blocks are this rank's slices."""
    from .modules.model import StepVideoModel
    from .weights import read_json

    fp8 = req.memory.quantize == "fp8_weight"
    llm = clip = vae_model = None
    with torch.device("meta"):
        dit = StepVideoModel.from_config(dit_cfg)
        tp = req.parallel.tensor_parallel_degree
        if tp > 1:
            from .parallel.torch_backend import shard_blocks

            shard_blocks(dit, 0, tp, None)
        if text:
            from .layout import HUNYUAN_CLIP, STEP_LLM
            from .text_encoder.clip import build_bert
            from .text_encoder.stepllm import Step1Config, Step1Model

            root = req.model_dir
            llm = Step1Model(Step1Config.from_dict(read_json(
                os.path.join(root, STEP_LLM.folder, STEP_LLM.config), "Step-1 config")))
            clip = build_bert(read_json(os.path.join(root, HUNYUAN_CLIP.folder,
                                                     HUNYUAN_CLIP.config), "HunyuanClip config"))
        if vae is not None:
            from .vae.vae import AutoencoderKL

            vae_model = AutoencoderKL.from_config(vae)
    return sizes_of(dit, llm, clip, vae_model, storage_bytes, fp8_dit=fp8, fp8_llm=fp8)


def plan_request(req, dit_cfg, device):
    """(MemoryOptions with ``auto`` resolved, the Plan or None). Plans only for CUDA devices;
    on the CPU ``auto`` means ``none``. PlanError when nothing fits the free memory. Per rank:
    sequence and CFG parallelism divide the tokens and the batch, tensor parallelism the blocks'
    weights; each degree's activation phases are in ``ActivationModel``."""
    m = req.memory
    if device.type != "cuda":
        return (dataclasses.replace(m, offload=OffloadConfig("none")) if m.offload.mode == "auto"
                else m), None
    from .devices import resolve_device, resolve_dtype

    here = req.encoder_device == "auto" or resolve_device(req.encoder_device) == device
    text, vae = here and req.caption_url == "local", here and req.vae_url == "local"
    dtype_bytes = torch.empty((), dtype=resolve_dtype(req.dtype, device)).element_size()
    vae_config = None
    if vae:
        from .layout import VAE
        from .vae.vae import resolve_checkpoint, resolve_config

        vae_config = resolve_config(resolve_checkpoint(os.path.join(req.model_dir, VAE.folder)), None)
    sizes = request_sizes(req, dit_cfg, dtype_bytes, text, vae_config)
    from .vae.local import parse_tile

    par = req.parallel
    work = workload_for(req.num_frames, req.height, req.width, batch=max(2 // par.cfg_degree, 1),
                        dtype_bytes=dtype_bytes, cfg_sequential=m.cfg_sequential,
                        ff_chunk=m.ff_chunk, compiled=req.compile, text_on_device=text,
                        vae_on_device=vae, vae=vae_config or VAE_PRESETS["base"], vae_tile=parse_tile(req.vae_tile))
    work = dataclasses.replace(work, tokens=-(-work.tokens // (par.ulysses_degree * par.ring_degree)),
                               tensor_parallel=par.tensor_parallel_degree,
                               ulysses=par.ulysses_degree, ring=par.ring_degree)
    p = plan(torch.cuda.mem_get_info(device)[0], sizes, work, m.offload)
    return dataclasses.replace(m, offload=p.offload), p
