"""The one attention seam: every DiT attention call goes through ``attention()``.

Layout is (B, S, H, D) in and out, the flash-attn convention. ``kv_lens`` (B,) optionally limits
sample b to its first ``kv_lens[b]`` keys (the cross-attention text mask, and the padding of an
uneven sequence-parallel split).

Backends:
- ``sdpa``  PyTorch scaled_dot_product_attention; always present, the reference and CPU path.
- ``flash`` flash-attn 2 (``pip install stepvideo[gpu]``); CUDA, fp16/bf16 only. Masked calls
            go through its varlen kernel, so the mask means exactly what it means for sdpa.
``auto`` is sdpa: on CUDA PyTorch dispatches it to its own FlashAttention-2 kernel (53.8% of the
H200's bf16 peak on a full-width block, benchmark/results/). ``flash`` stays opt-in until the GPU
check has compared it with sdpa on hardware that has flash-attn installed.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          kv_lens: torch.Tensor | None) -> torch.Tensor:
    mask = None
    if kv_lens is not None:
        keys = torch.arange(k.shape[1], device=k.device)
        mask = (keys[None, :] < kv_lens[:, None].to(k.device))[:, None, None, :]  # (B,1,1,Lk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           kv_lens: torch.Tensor | None) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if kv_lens is None:
        return flash_attn_func(q, k, v)
    b, sq, h, d = q.shape
    lk = kv_lens.to(device=q.device, dtype=torch.int32)
    cu_q = torch.arange(0, (b + 1) * sq, sq, device=q.device, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(lk, 0, dtype=torch.int32), (1, 0))
    keep = torch.arange(k.shape[1], device=k.device)[None, :] < lk[:, None]  # (B, Lk)
    out = flash_attn_varlen_func(q.reshape(b * sq, h, d), k[keep], v[keep], cu_q, cu_k,
                                 sq, int(lk.max()))
    return out.reshape(b, sq, h, d)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


BACKENDS: dict[str, Backend] = {"sdpa": _sdpa, "flash": _flash}
_selected = "auto"


def set_backend(name: str) -> None:
    """Choose the backend once for the process: 'auto', 'sdpa' or 'flash'."""
    global _selected
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of "
                         f"{['auto', *BACKENDS]}")
    if name == "flash" and not flash_available():
        raise RuntimeError("attention backend 'flash' needs flash-attn and a CUDA device; "
                           "install it with `pip install flash-attn --no-build-isolation` or use "
                           "'sdpa'")
    _selected = name


def get_backend() -> str:
    return _selected


def _resolve(q: torch.Tensor) -> str:
    if _selected == "flash" and not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        raise RuntimeError(f"attention backend 'flash' needs CUDA fp16/bf16 inputs, got {q.dtype} on "
                           f"{q.device}; use 'sdpa'")
    return "sdpa" if _selected == "auto" else _selected


def kernel_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_lens: torch.Tensor | None = None) -> str:
    """The kernel ``attention`` runs for these inputs: ``flash`` (flash-attn), or ``sdpa:`` and
    the SDPA backend PyTorch dispatches to (``FLASH_ATTENTION``, ``EFFICIENT_ATTENTION``,
    ``CUDNN_ATTENTION``, ``MATH``...), asked from PyTorch's own dispatcher."""
    name = _resolve(q)
    if name != "sdpa":
        return name
    from torch.nn.attention import SDPBackend

    t = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    mask = None
    if kv_lens is not None:
        mask = torch.ones(q.shape[0], 1, 1, k.shape[1], dtype=torch.bool, device=q.device)
    return f"sdpa:{SDPBackend(torch._fused_sdp_choice(*t, mask)).name}"


def probe_kernel(device: torch.device | str, dtype: torch.dtype, heads: int = 4,
                 head_dim: int = 128, tokens: int = 64, masked: bool = False) -> str:
    """``kernel_name`` for small inputs of this device, dtype and head dim."""
    q = torch.zeros(1, tokens, heads, head_dim, device=device, dtype=dtype)
    return kernel_name(q, q, q, torch.full((1,), tokens) if masked else None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kv_lens: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D); q (B,Sq,H,D), k/v (B,Sk,H,D) -> (B,Sq,H,D)."""
    return BACKENDS[backend or _resolve(q)](q, k, v, kv_lens)


class SequencePlan(Protocol):
    """How the DiT's tokens are split over ranks (see ``LocalPlan``)."""

    world_size: int

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...

    def gather(self, x: torch.Tensor, dim: int, seq_len: int) -> torch.Tensor: ...

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       seq_len: int) -> torch.Tensor: ...


class LocalPlan:
    """The sequence plan of a single process: no sharding, plain attention.

    What the DiT asks of a plan: ``shard(x, dim)`` after patchify (tokens and RoPE tables),
    ``self_attention(q, k, v, seq_len)`` inside each block and ``gather(x, dim, seq_len)`` before
    the final layer, where ``seq_len`` is the unsharded token count. Nothing else in the model knows
    about ranks; the distributed plans live in ``stepvideo.parallel``.
    """

    world_size = 1

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, dim: int, seq_len: int) -> torch.Tensor:
        return x

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       seq_len: int) -> torch.Tensor:
        return attention(q, k, v)
