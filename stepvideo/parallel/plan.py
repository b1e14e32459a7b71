"""What the DiT asks of a parallel layer, and the world-size-1 plan.

The model calls ``plan.shard`` after patchify (tokens and RoPE tables), ``plan.self_attention``
inside each block and ``plan.gather`` before the final layer. Nothing else in the model knows
about ranks. ``LocalPlan`` is the identity; the distributed plans live in ``stepvideo.parallel``.
"""

from __future__ import annotations

import torch

from ..modules.attention import attention


class LocalPlan:
    """Single process: no sharding, plain attention."""

    world_size = 1

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v)
