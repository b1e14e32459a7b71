"""Small building blocks shared by the DiT and the Step-1 encoder."""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, then scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: write the result there (a tensor or view of x's shape and dtype; may be x)."""
        normed = nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one kernel
        return torch.mul(normed.to(x.dtype), self.weight, out=out)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation x * (1 + scale) + shift; shift/scale broadcast over tokens (one fused
    multiply-add pass over x)."""
    return torch.addcmul(shift, x, 1 + scale)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] sinusoid of ``t`` (already scaled, e.g. t*1000): (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
