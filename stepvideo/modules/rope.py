"""3D rotary position embedding: head channels split [64, 32, 32] for (frame, row, column).

Each part is a rotate-half (NeoX) 1D RoPE with base 10000 and its own width in the exponent.
Tables are computed once per video shape in float32 (the public release computes the angles in
the activation dtype, which in bf16 loses precision) and applied in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

ROPE_SPLIT = (64, 32, 32)


class Rope(NamedTuple):
    """cos and sin tables (S, head_dim) of the tokens a rank holds."""

    cos: torch.Tensor
    sin: torch.Tensor

    def shard(self, plan) -> "Rope":
        """The rows of this rank's tokens: the sequence plan splits the tables as it splits x."""
        return Rope(plan.shard(self.cos, 0), plan.shard(self.sin, 0))


def rope_tables(frames: int, height: int, width: int, head_dim: int = 128,
                split: tuple[int, int, int] = ROPE_SPLIT, base: float = 10000.0,
                device: torch.device | str | None = None) -> Rope:
    """cos and sin tables (F*H*W, head_dim), tokens in frame-major order."""
    if sum(split) != head_dim:
        raise ValueError(f"RoPE split {split} must sum to the head dim {head_dim}")
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device)
                             for n in (frames, height, width)), indexing="ij")
    angles = []
    for pos, d in zip(grids, split):
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        a = pos.reshape(-1, 1) * inv_freq  # (S, d/2)
        angles.append(torch.cat([a, a], dim=-1))  # (S, d)
    theta = torch.cat(angles, dim=-1)  # (S, head_dim)
    return Rope(theta.cos(), theta.sin())


def apply_rope(x: torch.Tensor, rope: Rope, split: tuple[int, int, int] = ROPE_SPLIT,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x (B, S, H, D) by tables (S, D); computed in float32, returned in x's dtype (in
    ``out`` when given: a tensor or view of x's shape, e.g. a few heads of a larger output).

    Each part's halves (a, b) become (a cos - b sin, b cos + a sin): ``x * cos`` once, then each
    half adds its partner times sin in place, so no rotated copy of x is built. The float32 tables
    promote x (exactly) inside each kernel: a bf16 x is not copied to float32 first. With a float32
    ``out`` the rotation is computed in it directly; otherwise in a float32 temporary that is
    rounded once into x's dtype."""
    cos, sin = rope.cos[:, None], rope.sin[:, None]  # (S, 1, D): broadcast over batch and heads
    direct = out is not None and out.dtype == torch.promote_types(x.dtype, cos.dtype)
    res = torch.mul(x, cos, out=out) if direct else x * cos  # float32
    start = 0
    for width in split:
        a, b = slice(start, start + width // 2), slice(start + width // 2, start + width)
        res[..., a].addcmul_(x[..., b], sin[..., a], value=-1)
        res[..., b].addcmul_(x[..., a], sin[..., b])
        start += width
    if out is None:
        return res.to(x.dtype)
    return out if direct else out.copy_(res)
