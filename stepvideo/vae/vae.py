"""Step-Video Video-VAE, version 2 (64 latent channels, 16x spatial and 17->3 temporal compression).

A video is handled in independent chunks: 17 frames encode to 3 latent frames and 3 latent frames
decode to 17 frames. Inside a chunk every temporal operation is causal (zero frames are padded in
front), every GroupNorm normalises each frame on its own, and the mid-block attention is causal over
the flattened (t, h, w) token order. After decoding, neighbouring chunks are blended at their seam.

Tensors inside the encoder/decoder are (B, C, T, H, W); the public methods take and return
(B, T, C, H, W) like the release. Module names are the release's state-dict names, so a checkpoint
loads with a single rename (``CHECKPOINT_RENAMES``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stepvideo.layout import VAE, check_part, part_dir
from stepvideo.weights import load_safetensors, load_state_dict_strict, rename_keys

FRAMES_PER_CHUNK = 17        # video frames per independent chunk
LATENTS_PER_CHUNK = 3        # latent frames per chunk
SPATIAL_FACTOR = 16          # pixels per latent pixel (each side)
NORM_GROUPS = 32
SEAM_KEEP = 0.6              # chunk blend: new = 0.6 * itself + 0.4 * neighbour
# Peak bytes of one chunk's decode per decoded frame pixel, bf16, the released decoder width (128):
# an H200 decoded one untiled 544 x 992 chunk at a 28 GiB peak, 27.0 GiB of it beyond the weights
# (3160 bytes per pixel-frame). On the CPU the ops' tensors of a decode are exactly proportional to
# the decoded area and to the element size (2168.5 bytes per pixel-frame in bf16, 4336.9 in float32,
# at 2 x 2, 2 x 4 and 4 x 4 latent pixels; tests/test_vae_parallel.py), so the H200 figure, which
# adds cuDNN workspaces and the allocator's rounding, scales by area, element size and batch.
DECODE_BYTES_PER_PIXEL = 27.0 * 2**30 / (544 * 992)
# The tiled decode's float32 blend buffers per frame pixel: the sum (3 x 17 frames per sample) and
# one weight map.
TILE_BLEND_BYTES = 3 * FRAMES_PER_CHUNK * 4
TILE_WEIGHT_BYTES = 4
AUTO_TILE_MIN = 4            # the smallest tile (latent pixels) auto_tile_size picks

# Released-checkpoint prefix -> module prefix. The release stores the last decoder conv as
# `decoder.conv_out.*`; here (as in the release's modules) it is a causal conv with a `.conv` child.
CHECKPOINT_RENAMES: Mapping[str, str] = {"decoder.conv_out.": "decoder.conv_out.conv."}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEConfig:
    """Constructor arguments of :class:`AutoencoderKL`; the defaults are the released model."""

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 64
    num_res_blocks: int = 2
    version: int = 2
    encoder_ch: int = 32
    encoder_ch_mult: tuple[int, ...] = (4, 8, 16, 16)
    decoder_ch: int = 128
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4)

    def __post_init__(self):
        object.__setattr__(self, "encoder_ch_mult", tuple(self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult))
        if self.version != 2:
            raise ValueError(f"VAE version {self.version} is not supported: only the version-2 VAE "
                             "(vae_v2.safetensors, 64 latent channels) is implemented; the v1 VAE "
                             "(vae.safetensors) is out of scope.")
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            if len(getattr(self, name)) != 4:
                raise ValueError(f"{name} must have 4 levels (the down/up-sampling plan is fixed), "
                                 f"got {getattr(self, name)}")
        widths = {"encoder": [self.encoder_ch * m for m in (1,) + self.encoder_ch_mult],
                  "decoder": [self.decoder_ch * m for m in self.decoder_ch_mult]}
        for part, ws in widths.items():
            bad = [w for w in ws if w <= 0 or w % NORM_GROUPS]
            if bad:
                raise ValueError(f"{part} widths {ws} must all be positive multiples of "
                                 f"{NORM_GROUPS} (GroupNorm groups); {bad} are not")
        for name in ("in_channels", "out_channels", "z_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        top = self.decoder_ch * self.decoder_ch_mult[-1]
        if top < 4 * self.z_channels:
            raise ValueError(f"the decoder's top width decoder_ch x decoder_ch_mult[-1] = {top} must be "
                             f">= 4 x z_channels = {4 * self.z_channels} (its unpatchify shortcut "
                             "repeats the latent channels into it)")

    @classmethod
    def from_dict(cls, d: Mapping) -> "VAEConfig":
        """Build from a dict keyed by constructor keywords (keys starting with '_' are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown VAE config key(s) {unknown}; "
                             f"expected some of {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "VAEConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """``PRESETS["tiny"]``, with ``overrides`` replaced."""
        return dataclasses.replace(PRESETS["tiny"], **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


PRESETS: dict[str, VAEConfig] = {
    "base": VAEConfig(),   # the released vae_v2.safetensors
    # The tiny model's VAE (stepvideo.tiny). GroupNorm needs widths that are multiples of 32, and
    # the decoder's top width (32 x 2) must hold 4 x z_channels.
    "tiny": dataclasses.replace(VAEConfig(), z_channels=16, num_res_blocks=1, encoder_ch=32,
                                encoder_ch_mult=(1, 1, 2, 2), decoder_ch=32,
                                decoder_ch_mult=(1, 1, 2, 2)),
}


# --------------------------------------------------------------------------------------------
# Building blocks (all tensors (B, C, T, H, W))
# --------------------------------------------------------------------------------------------

class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm(32) whose statistics are taken over (C/32, H, W) of each frame separately (the
    version-2 behaviour; every norm of the released VAE is one). eps is nn.GroupNorm's default 1e-5
    (the kit rejects 1e-6)."""

    per_frame = True  # the only behaviour; version 1's whole-clip statistics are not supported

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(NORM_GROUPS, num_channels, eps=eps)

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        y = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        y = rearrange(y, "(b t) c h w -> b c t h w", b=x.shape[0])
        return F.silu(y, inplace=True) if silu else y


class CausalConv3d(nn.Module):
    """Conv3d over the current and previous frames only: ``kernel-1`` zero frames are padded in
    front, space gets 'same' zero padding. With stride 2 (kernel 3) T frames become (T+1)//2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
        return self.conv(x)


class ResnetBlock3D(nn.Module):
    """norm-SiLU-conv twice (zero frames padded after the activation), plus the input, projected
    by a 1x1x1 conv when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = FrameGroupNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h.add_(shortcut)


class CausalSelfAttention(nn.Module):
    """Single-head attention (head dim = C) over the T*H*W tokens of a chunk, causal in the
    flattened (t, h, w) order, so a token also ignores later tokens of its own frame.

    q, k and v are made contiguous before SDPA: with a strided last dim PyTorch falls back to its
    math kernel, which materialises the N x N causal mask and score matrix (N = 20 h w tokens per
    chunk: 6.7 GB at h = w = 64), while the fused kernels (flash on CPU, flash / memory-efficient
    on CUDA) apply ``is_causal`` blockwise in O(N C) memory."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = FrameGroupNorm(channels)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        n = self.norm(x)
        q, k, v = (p(n).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # (B, 1, THW, C)
                   for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, t, h, w)
        return self.proj_out(a).add_(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock3D(channels, channels)
        self.attn_1 = CausalSelfAttention(channels)
        self.block_2 = ResnetBlock3D(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def per_frame_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D conv to every frame of (B, C, T, H, W)."""
    b, c, t, h, w = x.shape
    y = conv(x.transpose(1, 2).reshape(b * t, c, h, w))                     # (B*T, C', H', W')
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Downsample2D(nn.Module):
    """Halve H and W of every frame: pad one zero row/column at the bottom/right, 3x3 stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame_conv2d(self.conv, F.pad(x, (0, 1, 0, 1)))


class Downsample3D(nn.Module):
    """Causal stride-2 conv in t, h and w: T -> (T+1)//2 (17 -> 9 -> 5)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest x2 in H and W, then a 3x3 conv, frame by frame."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return per_frame_conv2d(self.conv, x)


class UpsampleResBlock(nn.Module):
    """conv-norm-SiLU-conv-norm, then silu(h + x) + x: the release adds the input twice."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = CausalConv3d(channels, channels, 3)
        self.norm1 = FrameGroupNorm(channels)
        self.conv2 = CausalConv3d(channels, channels, 3)
        self.norm2 = FrameGroupNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x), silu=True)
        h = self.norm2(self.conv2(h))
        return F.silu(h.add_(x), inplace=True).add_(x)


class Upsample3D(nn.Module):
    """Nearest x2 in t, h and w, then :class:`UpsampleResBlock`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3d = UpsampleResBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3d(F.interpolate(x, scale_factor=2, mode="nearest"))


def pixel_unshuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*f^3, (T+f-1)/f, H/f, W/f), after padding f-1 zero frames in front.
    Channel layout (c, ft, fh, fw)."""
    x = F.pad(x, (0, 0, 0, 0, factor - 1, 0))
    b, c, t, h, w = x.shape
    f = factor
    x = x.view(b, c, t // f, f, h // f, f, w // f, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * f ** 3, t // f, h // f, w // f)


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`pixel_unshuffle_3d`: (B, C*f^3, T, H, W) -> (B, C, f*T-(f-1), f*H, f*W);
    the first f-1 frames are dropped."""
    b, c, t, h, w = x.shape
    f = factor
    c //= f ** 3
    x = x.view(b, c, f, f, f, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, t * f, h * f, w * f)[:, :, f - 1:]


def unshuffle_channel_average(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Parameter-free encoder shortcut: unshuffle, then average consecutive channel groups."""
    x = pixel_unshuffle_3d(x, factor)
    b, c, t, h, w = x.shape
    return x.view(b, out_channels, c // out_channels, t, h, w).mean(dim=2)


def repeat_channels_shuffle(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Parameter-free shortcut of the decoder: repeat every channel, then pixel-shuffle."""
    repeats = out_channels * factor ** 3 // x.shape[1]
    return pixel_shuffle_3d(x.repeat_interleave(repeats, dim=1), factor)


class ConvPixelUnshuffle3D(nn.Module):
    """Causal conv to C/8 channels, then :func:`pixel_unshuffle_3d` (the encoder's patchify)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(in_channels, out_channels // factor ** 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle_3d(self.conv(x), self.factor)


class ConvPixelShuffle3D(nn.Module):
    """Causal conv to 8*C channels, then :func:`pixel_shuffle_3d` (the decoder's unpatchify)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(in_channels, out_channels * factor ** 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), self.factor)


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, then an optional resampler."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int,
                 resample: nn.Module | None, resample_name: str):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock3D(i, o) for i, o in zip(widths, widths[1:]))
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return resample(x) if resample is not None else x


# --------------------------------------------------------------------------------------------
# Encoder and decoder (one chunk at a time)
# --------------------------------------------------------------------------------------------

SPATIAL_DOWN_LEVELS = (0,)       # encoder: 2D (spatial-only) downsample after level 0
TEMPORAL_DOWN_LEVELS = (1, 2)    # encoder: causal 3D downsample after levels 1 and 2
TEMPORAL_UP_LEVELS = (2, 3)      # decoder: 3D upsample after levels 3 and 2, 2D after level 1


class Encoder(nn.Module):
    """(B, 3, 17, H, W) -> moments (B, 2z, 3, H/16, W/16)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult, z = cfg.encoder_ch, cfg.encoder_ch_mult, cfg.z_channels
        self.conv_in = CausalConv3d(cfg.in_channels, ch, 3)
        widths = [ch] + [ch * m for m in mult]
        self.down = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
            resample = (Downsample2D(cout) if i in SPATIAL_DOWN_LEVELS else
                        Downsample3D(cout) if i in TEMPORAL_DOWN_LEVELS else None)
            self.down.append(Level(cin, cout, cfg.num_res_blocks, resample, "downsample"))
        top = widths[-1]
        self.mid = MidBlock(top)
        self.norm_out = FrameGroupNorm(top)
        self.patch_channels = 4 * z * 2 ** 3
        self.moment_channels = 2 * z
        self.conv_patchify = ConvPixelUnshuffle3D(top, self.patch_channels, 2)
        self.conv_out = CausalConv3d(self.patch_channels, self.moment_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                                                 # (B, ch, 17, H, W)
        for level in self.down:
            h = level(h)                                             # ... (B, C, 5, H/8, W/8)
        h = self.norm_out(self.mid(h), silu=True)
        h = self.conv_patchify(h).add_(unshuffle_channel_average(h, self.patch_channels, 2))
        # (B, 32z, 3, H/16, W/16)
        return self.conv_out(h).add_(unshuffle_channel_average(h, self.moment_channels, 1))


class Decoder(nn.Module):
    """(B, z, 3, h, w) -> (B, 3, 17, 16h, 16w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult, z = cfg.decoder_ch, cfg.decoder_ch_mult, cfg.z_channels
        top = ch * mult[-1]
        self.patch_channels = 4 * z * 2 ** 3
        self.top_channels = top
        self.conv_in = CausalConv3d(z, self.patch_channels, 3)
        self.conv_unpatchify = ConvPixelShuffle3D(self.patch_channels, top, 2)
        self.mid = MidBlock(top)
        self.up = nn.ModuleList()
        block_in = top
        for i in reversed(range(len(mult))):                 # built top-down, stored by level
            cout = ch * mult[i]
            resample = (None if i == 0 else
                        Upsample3D(cout) if i in TEMPORAL_UP_LEVELS else Upsample2D(cout))
            self.up.insert(0, Level(block_in, cout, cfg.num_res_blocks + 1, resample, "upsample"))
            block_in = cout
        self.norm_out = FrameGroupNorm(block_in)
        self.conv_out = CausalConv3d(block_in, cfg.out_channels, 3)
        # 3 latent frames -> 5 after unpatchify -> 20 after two temporal x2 -> drop 3 -> 17.
        self.drop_frames = 3

    def unpatchify(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z).add_(repeat_channels_shuffle(z, self.patch_channels, 1))
        # (B, 32z, 3, h, w) -> (B, top, 5, 2h, 2w)
        return self.conv_unpatchify(h).add_(repeat_channels_shuffle(h, self.top_channels, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.unpatchify(z))                                    # (B, top, 5, 2h, 2w)
        for level in reversed(self.up):
            h = level(h)                                             # ... (B, ch, 20, 16h, 16w)
        h = self.conv_out(self.norm_out(h, silu=True))
        return h[:, :, self.drop_frames:]                                   # (B, 3, 17, 16h, 16w)


# --------------------------------------------------------------------------------------------
# AutoencoderKL: chunking, seam blend, validation, loading
# --------------------------------------------------------------------------------------------

def blend_seam(last: torch.Tensor, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend the last frame of chunk k with the first frame of chunk k+1 (release order: the first
    frame is updated first, then the last frame uses the updated first frame)."""
    first = first * SEAM_KEEP + last * (1.0 - SEAM_KEEP)
    last = last * SEAM_KEEP + first * (1.0 - SEAM_KEEP)
    return last, first


def join_chunk(x: torch.Tensor, held: torch.Tensor | None,
               last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The streaming seam step for one decoded chunk ``x`` (B, n, 3, H, W): blend its first frame
    with ``held`` (the previous chunk's unemitted last frame), prepend that frame, and hold back
    this chunk's last frame unless it is the ``last`` chunk. Returns (frames to emit, held)."""
    if held is not None:
        held, first = blend_seam(held, x[:, :1])
        x[:, :1] = first
        x = torch.cat([held, x], dim=1)                                     # (B, n+1, 3, H, W)
    if last:
        return x, None
    return x[:, :-1], x[:, -1:].clone()


def decoded_frames(latent_frames: int) -> int:
    """Video frames that ``latent_frames`` decode to, by the release's rule.

    The release splits the latents into chunks of 3 (``z.split(3, dim=1)``), so the last chunk may
    hold 1 or 2 frames. Its decoder is causal in time: t latent frames become 2t-1 after the
    unpatchify shuffle, 4(2t-1) after the two temporal x2 upsamplers, minus the 3 dropped in front,
    i.e. 8t-7 frames (3 -> 17, 2 -> 9, 1 -> 1). So 1 -> 1 (an image), 4 -> 18, 5 -> 26, 6 -> 34."""
    if latent_frames < 1:
        raise ValueError(f"latent frame count must be >= 1, got {latent_frames}")
    full, rest = divmod(latent_frames, LATENTS_PER_CHUNK)
    return full * FRAMES_PER_CHUNK + (8 * rest - 7 if rest else 0)


# --------------------------------------------------------------------------------------------
# Spatial tiles: overlapping windows in latent units, blended linearly across the overlap
# --------------------------------------------------------------------------------------------

def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of windows of ``tile`` that cover [0, length), spread evenly so that neighbours
    overlap by at least ``overlap``; one window when ``tile`` covers everything."""
    if tile >= length:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_ramp(starts: list[int], i: int, tile: int, length: int, scale: int) -> torch.Tensor:
    """1D blend weights of window ``i`` in output units (``scale`` per latent unit): a linear ramp
    over each overlap with a neighbour ((p + 0.5) / overlap, so two overlapping ramps sum to 1),
    1 elsewhere and at the borders of the whole image."""
    start, end = starts[i], min(starts[i] + tile, length)
    w = torch.ones((end - start) * scale)
    if i > 0 and (ov := (starts[i - 1] + tile - start) * scale) > 0:
        w[:ov] = (torch.arange(ov) + 0.5) / ov
    if i + 1 < len(starts) and (ov := (end - starts[i + 1]) * scale) > 0:
        w[-ov:] = torch.minimum(w[-ov:], (torch.arange(ov - 1, -1, -1) + 0.5) / ov)
    return w


def check_tiles(tile_size: int | None, tile_overlap: int | None) -> tuple[int, int] | None:
    """(size, overlap) in latent units, or None for no tiling. The default overlap is a quarter
    of the tile (at least 1)."""
    if tile_size is None:
        if tile_overlap is not None:
            raise ValueError("tile_overlap needs tile_size")
        return None
    if tile_size < 2:
        raise ValueError(f"tile_size must be >= 2 latent pixels (32 px), got {tile_size}")
    overlap = max(tile_size // 4, 1) if tile_overlap is None else tile_overlap
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile_overlap must be in [0, tile_size={tile_size}), got {overlap}")
    return tile_size, overlap


class TileBlend:
    """The blend of ``tiled``, fed one window's output at a time in ``windows`` order (row-major),
    so that windows computed elsewhere (another rank) blend to the same bits as ``tiled``.

    ``h``/``w``: the input in latent pixels; ``scale_out`` output pixels per latent pixel."""

    def __init__(self, h: int, w: int, tile: int, overlap: int, scale_out: int):
        self.h, self.w, self.tile, self.scale = h, w, tile, scale_out
        self.rows, self.cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        self.windows = [(i, j) for i in range(len(self.rows)) for j in range(len(self.cols))]
        self.done = 0
        self.out = self.weight = None

    @property
    def single(self) -> bool:
        """One window covers the input: the result is that window's output itself."""
        return len(self.windows) == 1

    def window(self, k: int, scale_in: int) -> tuple[slice, slice]:
        """The input (rows, cols) slices of window ``k`` at ``scale_in`` input pixels per latent
        pixel."""
        i, j = self.windows[k]
        r, c = self.rows[i], self.cols[j]
        return (slice(r * scale_in, (r + self.tile) * scale_in),
                slice(c * scale_in, (c + self.tile) * scale_in))

    def add(self, part: torch.Tensor) -> None:
        """The output of the next window."""
        i, j = self.windows[self.done]
        h, w, s = self.h, self.w, self.scale
        wy, wx = tile_ramp(self.rows, i, self.tile, h, s), tile_ramp(self.cols, j, self.tile, w, s)
        if self.out is None:
            self.out = part.new_zeros(*part.shape[:-2], h * s, w * s, dtype=torch.float32)
            self.weight = torch.zeros(h * s, w * s, device=part.device)
        wt = (wy[:, None] * wx[None, :]).to(part.device)                     # (th, tw)
        ys = slice(self.rows[i] * s, self.rows[i] * s + part.shape[-2])
        xs = slice(self.cols[j] * s, self.cols[j] * s + part.shape[-1])
        self.out[..., ys, xs] += part.float() * wt
        self.weight[ys, xs] += wt
        self.done += 1

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        if self.done != len(self.windows):
            raise RuntimeError(f"{self.done} of {len(self.windows)} tiles blended")
        return self.out.div_(self.weight).to(dtype)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
          scale_in: int, scale_out: int) -> torch.Tensor:
    """``fn`` over overlapping spatial windows of ``x`` (B, C, T, H, W), blended.

    Windows are ``tile`` latent pixels wide (``scale_in`` input and ``scale_out`` output pixels per
    latent pixel). Each output window is weighted by the product of its row and column ramps and
    the sum is divided by the summed weights, so the blend is linear across every overlap. A window
    that covers the whole input is ``fn(x)`` itself (bit for bit). Memory: one window's ``fn`` plus
    a float32 output and an (H, W) weight map."""
    blend = TileBlend(x.shape[-2] // scale_in, x.shape[-1] // scale_in, tile, overlap, scale_out)
    if blend.single:
        return fn(x)
    for k in range(len(blend.windows)):
        ys, xs = blend.window(k, scale_in)
        part = fn(x[..., ys, xs])
        blend.add(part)
        del part
    return blend.result(x.dtype)


def decode_peak_bytes(config: VAEConfig, h: int, w: int, dtype: torch.dtype | int,
                      batch: int = 1, tile: int | None = None) -> int:
    """Estimated peak bytes (beyond the weights) of decoding one chunk of h x w latent pixels,
    untiled (``tile`` None, or a tile that covers the frame) or in ``tile``-wide square tiles: the
    decoded area of the frame or of one tile x ``DECODE_BYTES_PER_PIXEL``, scaled by the decoder's
    width over the release's (``decoder_ch`` / 128: the tiny preset's CPU measurement is 0.21 of
    the release's, its width ratio 0.25), the element size (``dtype``: a dtype or its bytes) and
    ``batch``; tiled, plus the frame's float32 blend buffers. The one estimate for both
    ``--vae_tile auto`` at decode time and the memory planner (``stepvideo.memory_plan``)."""
    elem = dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()
    per_pixel = DECODE_BYTES_PER_PIXEL * config.decoder_ch / 128 * elem / 2 * batch
    frame = (SPATIAL_FACTOR * h) * (SPATIAL_FACTOR * w)
    if tile is None or tile >= max(h, w):
        return int(per_pixel * frame)
    window = (SPATIAL_FACTOR * min(tile, h)) * (SPATIAL_FACTOR * min(tile, w))
    return int(per_pixel * window) + (batch * TILE_BLEND_BYTES + TILE_WEIGHT_BYTES) * frame


def auto_tile_size(config: VAEConfig, h: int, w: int, dtype: torch.dtype | int, budget: int,
                   batch: int = 1) -> int | None:
    """None when an h x w chunk fits ``budget`` bytes untiled, else the largest square tile (in
    latent pixels, down to ``AUTO_TILE_MIN``: the floor when none fits) whose decode fits it."""
    if decode_peak_bytes(config, h, w, dtype, batch) <= budget:
        return None
    tile = max(h, w) - 1
    while tile > AUTO_TILE_MIN and decode_peak_bytes(config, h, w, dtype, batch, tile) > budget:
        tile -= 1
    return max(tile, AUTO_TILE_MIN)


class AutoencoderKL(nn.Module):
    """The Step-Video Video-VAE v2. ``decode``: (B, 3n, z, h, w) -> (B, 17n, 3, 16h, 16w);
    ``encode``: (B, 17n, 3, H, W) -> (B, 3n, z, H/16, W/16)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, z_channels: int = 64,
                 num_res_blocks: int = 2, version: int = 2, encoder_ch: int = 32,
                 encoder_ch_mult: tuple[int, ...] = (4, 8, 16, 16), decoder_ch: int = 128,
                 decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4)):
        super().__init__()
        self.config = VAEConfig(in_channels, out_channels, z_channels, num_res_blocks, version,
                                encoder_ch, encoder_ch_mult, decoder_ch, decoder_ch_mult)
        self.frame_len = FRAMES_PER_CHUNK
        self.latent_len = LATENTS_PER_CHUNK
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    @classmethod
    def from_config(cls, config: VAEConfig) -> "AutoencoderKL":
        return cls(**dataclasses.asdict(config))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- decode -------------------------------------------------------------------------

    def check_latents(self, z: torch.Tensor) -> None:
        zc = self.config.z_channels
        if z.ndim != 5:
            raise ValueError(f"decode expects latents (B, frames, {zc}, h, w) with 5 dims; got "
                             f"shape {tuple(z.shape)}")
        if z.shape[2] != zc:
            raise ValueError(f"latents have {z.shape[2]} channels (dim 2) but this VAE expects "
                             f"z_channels={zc}; latents must be (B, frames, {zc}, h, w)")
        if z.shape[1] == 0 or z.shape[3] == 0 or z.shape[4] == 0:
            raise ValueError(f"latents {tuple(z.shape)} are empty: frames, h and w must be >= 1")

    def decode_chunk(self, z: torch.Tensor, tile_size: int | None = None,
                     tile_overlap: int | None = None) -> torch.Tensor:
        """One chunk (1-3 latent frames) without blending: (B, t, z, h, w) -> (B, 8t-7, 3, 16h,
        16w); in overlapping spatial tiles of ``tile_size`` latent pixels when given."""
        tiles = check_tiles(tile_size, tile_overlap)
        with torch.no_grad():
            z = z.to(device=self.device, dtype=self.dtype).transpose(1, 2)  # (B, z, t, h, w)
            if tiles is None:
                return self.decoder(z).transpose(1, 2)                      # (B, 17, 3, H, W)
            return tiled(self.decoder, z, *tiles, 1, SPATIAL_FACTOR).transpose(1, 2)

    def iter_decode(self, z: torch.Tensor, tile_size: int | None = None,
                    tile_overlap: int | None = None) -> Iterator[torch.Tensor]:
        """Decode one chunk at a time and yield frames as soon as they are final.

        The seam blend changes the last frame of chunk k using chunk k+1, so that frame is held
        back: after chunk 0 the generator yields its first 16 frames; after chunk k >= 1 it yields
        the (blended) last frame of chunk k-1 followed by all but the last frame of chunk k; the
        last chunk's final frame is appended to the last yield. Concatenated along dim 1 the pieces
        equal ``decode(z)`` exactly, and memory stays that of one chunk. A latent count that is
        not a multiple of 3 ends in a short chunk, as in the release (``decoded_frames``).
        """
        self.check_latents(z)
        tiles = check_tiles(tile_size, tile_overlap)
        chunks = z.split(LATENTS_PER_CHUNK, dim=1)
        held = None                                                         # (B, 1, 3, H, W)
        for i, chunk in enumerate(chunks):
            x = self.decode_chunk(chunk, *(tiles or (None, None)))          # (B, 17, 3, H, W)
            x, held = join_chunk(x, held, last=i + 1 == len(chunks))
            yield x
            del x

    def decode(self, z: torch.Tensor,
               callback: Callable[[int, torch.Tensor], None] | None = None,
               tile_size: int | None = None, tile_overlap: int | None = None) -> torch.Tensor:
        """(B, f, z, h, w) -> (B, decoded_frames(f), 3, 16h, 16w), chunk by chunk, seams blended
        (f = 3n gives 17n frames).

        ``tile_size``/``tile_overlap`` (latent pixels) decode every chunk in overlapping spatial
        tiles blended linearly (``tiled``); a tile that covers the latent is the untiled decode.
        ``callback(chunk_index, frames)`` is called after each chunk with the frames that
        ``iter_decode`` yields for it."""
        self.check_latents(z)
        out = None
        start = 0
        for i, piece in enumerate(self.iter_decode(z, tile_size, tile_overlap)):
            if out is None:
                out = piece.new_empty(z.shape[0], decoded_frames(z.shape[1]), *piece.shape[2:])
            out[:, start:start + piece.shape[1]] = piece
            if callback is not None:
                callback(i, piece)
            start += piece.shape[1]
        return out

    # ---- encode -------------------------------------------------------------------------

    def check_video(self, x: torch.Tensor) -> None:
        c = self.config.in_channels
        if x.ndim != 5:
            raise ValueError(f"encode expects a video (B, frames, {c}, H, W) with 5 dims; got "
                             f"shape {tuple(x.shape)}")
        b, f, ch, h, w = x.shape
        if ch != c:
            raise ValueError(f"video has {ch} channels (dim 2) but this VAE expects "
                             f"in_channels={c}; videos must be (B, frames, {c}, H, W)")
        if f == 0 or f % FRAMES_PER_CHUNK:
            raise ValueError(f"video frame count {f} must be a positive multiple of "
                             f"{FRAMES_PER_CHUNK} (every {FRAMES_PER_CHUNK} frames encode to "
                             f"{LATENTS_PER_CHUNK} latent frames)")
        if h == 0 or w == 0 or h % SPATIAL_FACTOR or w % SPATIAL_FACTOR:
            raise ValueError(f"video height and width must be positive multiples of "
                             f"{SPATIAL_FACTOR}; got H={h}, W={w}")

    def encode_moments(self, x: torch.Tensor, tile_size: int | None = None,
                       tile_overlap: int | None = None) -> torch.Tensor:
        """(B, 17n, 3, H, W) -> raw moments (B, 3n, 2z, H/16, W/16) = [mean | logvar] on dim 2;
        with ``tile_size`` (latent pixels) each chunk is encoded in overlapping tiles of
        16 x tile_size pixels whose moments are blended linearly."""
        self.check_video(x)
        tiles = check_tiles(tile_size, tile_overlap)
        parts = []
        with torch.no_grad():
            for chunk in x.split(FRAMES_PER_CHUNK, dim=1):
                chunk = chunk.to(device=self.device, dtype=self.dtype).transpose(1, 2)
                m = (self.encoder(chunk) if tiles is None else
                     tiled(self.encoder, chunk, *tiles, SPATIAL_FACTOR, 1))
                parts.append(m.transpose(1, 2))                            # (B, 3, 2z, h, w)
        return torch.cat(parts, dim=1)

    @staticmethod
    def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Moments -> (mean, logvar) with logvar clamped to [-30, 20]."""
        mean, logvar = moments.chunk(2, dim=2)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None,
               tile_size: int | None = None, tile_overlap: int | None = None) -> torch.Tensor:
        """(B, 17n, 3, H, W) -> a latent sample mean + std * noise, (B, 3n, z, H/16, W/16).

        As in the release the noise is one ``torch.randn`` of the latent's shape drawn after all
        chunks are encoded, from ``generator`` or else the global RNG. Tiles as in
        ``encode_moments``."""
        mean, logvar = self.split_moments(self.encode_moments(x, tile_size, tile_overlap))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    # ---- checkpoints --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        config: VAEConfig | Mapping | None = None) -> "AutoencoderKL":
        """Load ``vae_v2.safetensors`` from a file, a ``vae/`` directory or a model directory.

        Widths come from ``config``, else a ``config.json`` next to the file, else the defaults
        (the released checkpoint has no config). Keys are checked strictly (CheckpointError)."""
        file = resolve_checkpoint(path)
        cfg = resolve_config(file, config)
        with torch.device("meta"):
            model = cls.from_config(cfg)
        state = load_safetensors([file], dtype=dtype, device=device)
        state = rename_keys(state, CHECKPOINT_RENAMES)
        load_state_dict_strict(model, state, what=f"VAE checkpoint {file}")
        return model.eval().requires_grad_(False)


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The checkpoint file for ``path``: the file itself, or ``vae_v2.safetensors`` of a ``vae/``
    folder or of a model root holding one (stepvideo.layout)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    (file,) = check_part(VAE, part_dir(VAE, path))
    return file


def resolve_config(file: str, config: VAEConfig | Mapping | None) -> VAEConfig:
    if isinstance(config, VAEConfig):
        return config
    if config is not None:
        return VAEConfig.from_dict(config)
    side = os.path.join(os.path.dirname(file), VAE.config)
    return VAEConfig.from_json(side) if os.path.isfile(side) else VAEConfig()


def state_dict_for_checkpoint(model: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The model's state dict under the released file's key names (``CHECKPOINT_RENAMES``
    reversed), ready for ``safetensors.torch.save_file``."""
    reverse = {new: old for old, new in CHECKPOINT_RENAMES.items()}
    return {k: v.contiguous() for k, v in rename_keys(model.state_dict(), reverse).items()}
