"""The one attention seam: every DiT attention call goes through ``attention()``.

Layout is (B, S, H, D) in and out, the flash-attn convention. ``kv_lens`` (B,) optionally limits
sample b to its first ``kv_lens[b]`` keys (the cross-attention text mask). The keys may be fewer
than the queries (an uneven Ulysses split cuts its padded keys before calling the seam).

Backends (``BACKENDS``; each is checked against ``sdpa`` with and without ``kv_lens``):
- ``sdpa``   PyTorch scaled_dot_product_attention, dispatcher's choice; always present, the
             reference and the CPU path.
- ``cudnn``  the same call pinned to PyTorch's cuDNN attention (CUDA, fp16/bf16).
- ``flash``  flash-attn 2 (``pip install flash-attn``); CUDA, fp16/bf16.
- ``fa4``    flash-attn 4's CuTe-DSL kernels (``pip install flash-attn-4``; sm90/sm100, bf16/fp16).
- ``flex``   FlexAttention (torch.compile'd on CUDA, eager on the CPU).
- ``sage``   8-bit: SageAttention's Triton kernel (``pip install sageattention``): INT8 Q.K^T
             with per-block scales, fp16 P.V. Not exact: opt-in only, never picked by ``auto``.
``auto`` on CUDA times the installed exact backends (all but ``flex``) once per input signature at
the real shapes (``choose_fastest``), caches the winner and prints it; on the CPU it is ``sdpa``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

BackendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
HALF = (torch.float16, torch.bfloat16)


# --- kernels ------------------------------------------------------------------------------------

def _key_mask(k: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    keys = torch.arange(k.shape[1], device=k.device)
    return (keys[None, :] < kv_lens[:, None].to(k.device))[:, None, None, :]  # (B,1,1,Lk)


def _sdpa(q, k, v, kv_lens):
    mask = None if kv_lens is None else _key_mask(k, kv_lens)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def _per_sample(fn: BackendFn, q, k, v, kv_lens):
    """A kernel without a key mask: run each sample on its first kv_lens[b] keys (exact)."""
    if kv_lens is None:
        return fn(q, k, v, None)
    lens = kv_lens.tolist()
    if all(n == k.shape[1] for n in lens):
        return fn(q, k, v, None)
    return torch.cat([fn(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], None)
                      for b, n in enumerate(lens)])


def _cudnn_dense(q, k, v, kv_lens):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return _sdpa(q, k, v, None)


def _cudnn(q, k, v, kv_lens):
    return _per_sample(_cudnn_dense, q, k, v, kv_lens)


def _flash(q, k, v, kv_lens):
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


def _eager(fn):
    """``fn`` run outside any torch.compile graph (a graph break there), as
    ``torch.compiler.disable`` does; the disabled function is made at the first call or by
    ``prepare_compile``, since importing torch._dynamo at import time costs every process seconds."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return _disabled(fn)(*args, **kwargs)

    _EAGER.append(fn)
    return call


_EAGER: list[Callable] = []
_DISABLED: dict[Callable, Callable] = {}


def _disabled(fn: Callable) -> Callable:
    if fn not in _DISABLED:
        _DISABLED[fn] = torch.compiler.disable(fn)
    return _DISABLED[fn]


def prepare_compile() -> None:
    """Make the eager-only wrappers before torch.compile traces a caller (``compile_blocks``)."""
    for fn in _EAGER:
        _disabled(fn)


@_eager  # a CuTe-DSL launch: not traceable, called as is
def _fa4(q, k, v, kv_lens):
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    if kv_lens is None:
        out = flash_attn_func(q, k, v)
    else:  # batched q/k with seqused_k: sample b reads its first kv_lens[b] keys
        lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
        out = flash_attn_varlen_func(q, k, v, seqused_k=lens)
    return out[0] if isinstance(out, tuple) else out  # (out, lse)


_flex_compiled = None


def _flex(q, k, v, kv_lens):
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fn = flex_attention
    if q.is_cuda:  # eager flex is a reference implementation; the fused kernel needs compile
        _flex_compiled = _flex_compiled or torch.compile(flex_attention, dynamic=True)
        fn = _flex_compiled
    block_mask = None
    if kv_lens is not None:
        lens = kv_lens.to(q.device)

        def keep(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        block_mask = create_block_mask(keep, q.shape[0], None, q.shape[1], k.shape[1],
                                       device=q.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


@_eager  # Triton launches from Python: called as is inside a compiled block
def _sage_dense(q, k, v, kv_lens):
    from sageattention import sageattn

    # Smooth K here, out of place (sageattn would subtract the mean from the caller's k in place);
    # softmax is unchanged by it, and it keeps the INT8 range for the part that differs by token.
    k = k - k.mean(dim=1, keepdim=True)
    return sageattn(q, k, v, tensor_layout="NHD", smooth_k=False)


def _sage(q, k, v, kv_lens):
    return _per_sample(_sage_dense, q, k, v, kv_lens)


# --- the registry -------------------------------------------------------------------------------

def _installed(dist: str) -> bool:
    """A distribution is installed (by metadata: flash-attn 2 and 4 share the flash_attn name)."""
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    exact: bool  # computes softmax attention to the input dtype's rounding (sdpa's numbers)
    cuda_only: bool
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating dtype
    package: str | None  # the distribution it needs
    install: str  # what to run when it is missing
    min_capability: tuple[int, int] = (0, 0)
    auto: bool = True  # a candidate of ``auto`` (when exact, installed and given suitable inputs)

    def missing(self) -> str | None:
        """Why this backend cannot be used in this process, or None when it can."""
        if self.package and not _installed(self.package):
            return f"attention backend {self.name!r} needs {self.install}"
        if self.cuda_only and not torch.cuda.is_available():
            return f"attention backend {self.name!r} needs a CUDA device; this process has none"
        if self.cuda_only and (cc := torch.cuda.get_device_capability()) < self.min_capability:
            return (f"attention backend {self.name!r} needs compute capability >= "
                    f"{self.min_capability}, this device has {cc}")
        return None

    def refuse_inputs(self, q: torch.Tensor) -> str | None:
        if self.cuda_only and not q.is_cuda:
            return f"attention backend {self.name!r} needs CUDA inputs, got {q.device}"
        if self.dtypes and q.dtype not in self.dtypes:
            return (f"attention backend {self.name!r} needs {[str(d) for d in self.dtypes]} inputs, "
                    f"got {q.dtype}")
        return None


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("sdpa", _sdpa, True, False, None, None, "nothing (always present)"),
    Backend("cudnn", _cudnn, True, True, HALF, None, "a CUDA build of PyTorch with cuDNN",
            (8, 0)),
    Backend("flash", _flash, True, True, HALF, "flash-attn",
            "flash-attn: `pip install flash-attn --no-build-isolation`"),
    Backend("fa4", _fa4, True, True, HALF, "flash-attn-4",
            "flash-attn 4: `pip install flash-attn-4` (sm90/sm100)", (9, 0)),
    # flex compiles a kernel per shape and mask (tens of seconds): too slow for auto's short
    # one-time benchmark, and its dense kernel trails cuDNN/FA3-class kernels at head dim 128 in
    # published figures; benchmark/gpu_speed.py measures it, choose it by name.
    Backend("flex", _flex, True, False, None, None, "PyTorch >= 2.5 (FlexAttention)", auto=False),
    Backend("sage", _sage, False, True, HALF + (torch.float32,), "sageattention",
            "SageAttention: `pip install sageattention` (8-bit, Triton)", (8, 0)),
)}
NAMES = ("auto", *BACKENDS)
_selected = "auto"


def set_backend(name: str) -> None:
    """Choose the backend once for the process: ``auto`` or a name in ``BACKENDS``."""
    global _selected
    if name not in NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(NAMES)}")
    if name != "auto" and (why := BACKENDS[name].missing()):
        raise RuntimeError(f"{why}; or choose one of {available_backends()}")
    _selected = name


def get_backend() -> str:
    return _selected


def available_backends() -> list[str]:
    """Backend names usable in this process (installed, device present)."""
    return [n for n, b in BACKENDS.items() if b.missing() is None]


def _resolve(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kv_lens: torch.Tensor | None) -> str:
    if _selected == "auto":
        return auto_choice(q, k, v, kv_lens)
    if why := BACKENDS[_selected].refuse_inputs(q):
        raise RuntimeError(f"{why}; use 'sdpa'")
    return _selected


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kv_lens: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D); q (B,Sq,H,D), k/v (B,Sk,H,D) -> (B,Sq,H,D)."""
    return BACKENDS[backend or _resolve(q, k, v, kv_lens)].fn(q, k, v, kv_lens)


# --- auto: a one-time micro-benchmark per input signature ----------------------------------------

_AUTO: dict[tuple, str] = {}  # signature -> chosen backend
AUTO_TIMINGS: dict[tuple, dict[str, float | str]] = {}  # signature -> backend -> seconds or error


def signature(q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor | None) -> tuple:
    return (str(q.device), str(q.dtype), tuple(q.shape), tuple(k.shape), kv_lens is not None)


def choose_fastest(timings: dict[str, float | str]) -> str:
    """The backend with the smallest time; an entry that is a string (the error it raised) loses.
    Ties keep the registry order, so ``sdpa`` wins a tie."""
    times = {n: t for n, t in timings.items() if not isinstance(t, str)}
    if not times:
        raise RuntimeError(f"no attention backend ran: {timings}")
    order = list(BACKENDS)
    return min(times, key=lambda n: (times[n], order.index(n) if n in order else len(order)))


def auto_candidates(q: torch.Tensor) -> list[str]:
    """Exact backends that are installed and accept these inputs; just ``sdpa`` on the CPU."""
    if not q.is_cuda:
        return ["sdpa"]
    return [n for n, b in BACKENDS.items()
            if b.exact and b.auto and b.missing() is None and b.refuse_inputs(q) is None]


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def time_backend(name: str, q, k, v, kv_lens, ref: torch.Tensor | None = None,
                 repeats: int = 3, atol: float = 2e-2) -> float | str:
    """Median seconds of ``repeats`` calls after one warm-up, or the error as a string; a backend
    whose output is further than ``atol`` from ``ref`` is refused (it would change the numbers)."""
    fn = BACKENDS[name].fn
    try:
        out = fn(q, k, v, kv_lens)  # warm-up (JIT compiles here)
        if ref is not None and (err := (out.float() - ref.float()).abs().max().item()) > atol:
            return f"max abs error {err:.3g} vs sdpa exceeds {atol}"
        times = []
        for _ in range(repeats):
            _sync(q)
            t0 = time.perf_counter()
            fn(q, k, v, kv_lens)
            _sync(q)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    except Exception as e:  # a backend that fails at these shapes is reported and skipped
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


@_eager
def auto_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_lens: torch.Tensor | None, timer: Callable = time_backend) -> str:
    """The backend ``auto`` runs for these inputs: cached per signature; on a miss every candidate
    is timed once on the real inputs (outside any torch.compile graph) and the choice printed."""
    key = signature(q, k, kv_lens)
    if key in _AUTO:
        return _AUTO[key]
    names = auto_candidates(q)
    if len(names) == 1:
        _AUTO[key] = names[0]
        return names[0]
    with torch.no_grad():
        ref = _sdpa(q, k, v, kv_lens)
        timings = {n: timer(n, q, k, v, kv_lens, ref) for n in names}
    choice = choose_fastest(timings)
    _AUTO[key], AUTO_TIMINGS[key] = choice, timings
    shown = ", ".join(f"{n} {t * 1e3:.2f} ms" if not isinstance(t, str) else f"{n} failed ({t})"
                      for n, t in timings.items())
    print(f"attention auto: {choice} for q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype}"
          f"{' masked' if kv_lens is not None else ''} [{shown}]", file=sys.stderr, flush=True)
    return choice


def auto_choices() -> dict[str, str]:
    """What ``auto`` chose so far, readable: 'q(2, 75888, 48, 128) k(...) masked' -> name."""
    return {f"q{key[2]} k{key[3]} {key[1]}{' masked' if key[4] else ''}": name
            for key, name in _AUTO.items()}


def clear_auto_cache() -> None:
    _AUTO.clear()
    AUTO_TIMINGS.clear()


# --- what actually runs ------------------------------------------------------------------------

def kernel_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_lens: torch.Tensor | None = None) -> str:
    """The kernel ``attention`` runs for these inputs: a backend name, ``sdpa:`` and the SDPA
    backend PyTorch dispatches to (``FLASH_ATTENTION``, ``CUDNN_ATTENTION``, ``MATH``...), or, for
    ``auto`` on CUDA before its first call, ``auto`` (the choice is made at the real shapes)."""
    if _selected == "auto" and q.is_cuda and signature(q, k, kv_lens) not in _AUTO:
        return "auto"
    name = _resolve(q, k, v, kv_lens)
    if name == "cudnn":
        return "sdpa:CUDNN_ATTENTION"
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


# --- sequence plans ----------------------------------------------------------------------------

class SequencePlan(Protocol):
    """How the DiT's tokens are split over ranks (see ``LocalPlan``)."""

    world_size: int

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...

    def gather(self, x: torch.Tensor, dim: int, seq_len: int) -> torch.Tensor: ...

    def token_range(self, n: int) -> tuple[int, int, int]: ...

    def self_attention(self, qkv: list[torch.Tensor], seq_len: int) -> torch.Tensor: ...


class LocalPlan:
    """The sequence plan of a single process: no sharding, plain attention.

    What the DiT asks of a plan: ``shard(x, dim)`` after patchify (tokens and RoPE tables),
    ``self_attention([q, k, v], seq_len)`` inside each block and ``gather(x, dim, seq_len)`` after
    the final layer, where ``seq_len`` is the unsharded token count. ``self_attention`` owns
    the list's tensors: it empties the list, so a plan that repacks them can free them early. Nothing else in the model knows
    about ranks; the distributed plans live in ``stepvideo.parallel``.
    """

    world_size = 1

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, dim: int, seq_len: int) -> torch.Tensor:
        return x

    def token_range(self, n: int) -> tuple[int, int, int]:
        """(start, stop, size): ``shard`` of n tokens holds tokens [start, stop), zero-padded to
        size."""
        return 0, n, n

    def self_attention(self, qkv: list[torch.Tensor], seq_len: int) -> torch.Tensor:
        q, k, v = qkv
        qkv.clear()
        return attention(q, k, v)
