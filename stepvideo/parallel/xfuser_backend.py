"""GPU sequence parallelism through xfuser (xDiT), as the public release runs it: xfuser's
distributed environment (``init_distributed_environment`` + ``initialize_model_parallel``) and its
``xFuserLongContextAttention`` (yunchang's hybrid Ulysses all-to-all + ring attention).

Optional and GPU-only: imported only when ``--parallel_backend xfuser`` is chosen; the torch
backend stays the default and the CPU path. Requirements are checked before any process group or
weight exists, each failure one line naming the fix (:func:`check_xfuser`):

- CUDA: xfuser's attention layer is only defined on CUDA hosts.
- The pinned pair xfuser 0.4.5 + yunchang 0.6.4 (``pip install 'stepvideo[xfuser]'``). PyPI
  xfuser 0.5-0.7 import ``update_npu_out`` from yunchang's ring package on every CUDA host, and no
  PyPI yunchang has it (it reached yunchang's repository after 0.6.4), so they fail at import. A
  shim that plants the missing name in yunchang would patch a third-party module at import time
  and still leave the newer xfuser's attention API untested here; a pin is explicit and is what
  the GPU check exercises.
- No tensor parallelism: xfuser hands yunchang a sequence-parallel layout of consecutive ranks
  (``set_seq_parallel_pg``), which holds only when the tensor-parallel degree is 1.

Layouts agree by construction: with tp = 1, xfuser's rank order ``tp-sp-pp-cfg-dp`` and yunchang's
"ulysses low" split give rank = cfg_i * (ring * ulysses) + ring_i * ulysses + u_i, which is
``ParallelConfig``'s layout; :func:`init_xfuser` checks every coordinate anyway. Our own groups
(same members) still shard, gather and split CFG; xfuser's do the attention. yunchang does not mask
padded keys, so the token count must split evenly (the torch backend handles uneven splits).
"""

from __future__ import annotations

import importlib.metadata

import torch

from .config import ParallelConfig
from .context import LaunchEnv
from .torch_backend import Groups, UlyssesPlan

PINNED = {"xfuser": "0.4.5", "yunchang": "0.6.4"}
# Kernels inside the long-context attention (yunchang AttnType values): flash-attn 2, or PyTorch's
# flash / memory-efficient SDPA kernels. Always an explicit choice, never xfuser's flash-only default.
ATTN_TYPES = ("fa", "torch_flash", "torch_efficient")
INSTALL = "pip install 'stepvideo[xfuser]' (xfuser==0.4.5, yunchang==0.6.4)"


def installed_versions() -> dict[str, str | None]:
    out = {}
    for name in PINNED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def version_problem(versions: dict[str, str | None]) -> str | None:
    """Why these installed versions cannot serve ``--parallel_backend xfuser``, or None."""
    missing = [n for n, v in versions.items() if v is None]
    if missing:
        return f"{' and '.join(missing)} not installed; {INSTALL}"
    wrong = {n: v for n, v in versions.items() if v != PINNED[n]}
    if wrong:
        found = ", ".join(f"{n} {v}" for n, v in versions.items())
        return (f"found {found}, but this backend is pinned to xfuser 0.4.5 + yunchang 0.6.4 (PyPI "
                "xfuser 0.5-0.7 import update_npu_out, which no PyPI yunchang has); " + INSTALL)
    return None


def check_xfuser(config: ParallelConfig, device: torch.device | str,
                 versions: dict[str, str | None] | None = None) -> None:
    """RuntimeError in one line when the xfuser backend cannot run here (see the module)."""
    if config.tensor_parallel_degree > 1:
        raise RuntimeError("--parallel_backend xfuser does not combine with "
                           f"--tensor_parallel_degree {config.tensor_parallel_degree} (xfuser "
                           "assumes consecutive sequence-parallel ranks); use ulysses/ring/cfg "
                           "degrees, or --parallel_backend torch")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"--parallel_backend xfuser runs on CUDA GPUs only (this rank's device "
                           f"is {device}); use --parallel_backend torch")
    problem = version_problem(installed_versions() if versions is None else versions)
    if problem:
        raise RuntimeError(f"--parallel_backend xfuser: {problem}")


def default_attn_type() -> str:
    """flash-attn 2 when it imports, else PyTorch's flash kernel."""
    import importlib.util

    return "fa" if importlib.util.find_spec("flash_attn") is not None else "torch_flash"


def init_xfuser(config: ParallelConfig, env: LaunchEnv, groups: Groups) -> None:
    """xfuser's environment over the already initialised default process group (NCCL), its
    CFG/sequence groups for ``config``, and a check that every coordinate matches ours."""
    from xfuser.core import distributed as xd

    xd.init_distributed_environment(rank=env.rank, world_size=env.world_size,
                                    local_rank=env.local_rank)
    if not xd.model_parallel_is_initialized():
        xd.initialize_model_parallel(classifier_free_guidance_degree=config.cfg_degree,
                                     sequence_parallel_degree=config.sp_degree,
                                     ulysses_degree=config.ulysses_degree,
                                     ring_degree=config.ring_degree)
    theirs = {"ulysses": (xd.get_ulysses_parallel_rank(), xd.get_ulysses_parallel_world_size()),
              "ring": (xd.get_ring_parallel_rank(), xd.get_ring_parallel_world_size()),
              "cfg": (xd.get_classifier_free_guidance_rank(),
                      xd.get_classifier_free_guidance_world_size())}
    ours = {"ulysses": (groups.coords["ulysses"], config.ulysses_degree),
            "ring": (groups.coords["ring"], config.ring_degree),
            "cfg": (groups.coords["cfg"], config.cfg_degree)}
    if theirs != ours:
        raise RuntimeError(f"xfuser's process groups disagree with ours on rank {env.rank}: "
                           f"(rank, size) xfuser {theirs}, stepvideo {ours}")


class XFuserPlan(UlyssesPlan):
    """UlyssesPlan with self-attention done by xfuser's ``xFuserLongContextAttention``."""

    def __init__(self, groups: Groups, env: LaunchEnv, attn_type: str | None = None):
        super().__init__(groups)
        attn_type = attn_type or default_attn_type()
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
        init_xfuser(groups.cfg, env, groups)
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from yunchang.kernels import AttnType

        self.attn_type = attn_type
        self.attn = xFuserLongContextAttention(ring_impl_type="basic",
                                               attn_type=AttnType.from_string(attn_type))

    def token_range(self, n: int) -> tuple[int, int, int]:
        """``UlyssesPlan.token_range`` (which ``shard`` uses), for an even split only."""
        if n % self.world_size:
            raise ValueError(
                f"{n} tokens do not split evenly over {self.world_size} sequence-parallel "
                "ranks, and the xfuser backend cannot mask padding; pick a size whose latent "
                "frames x height x width divide evenly, or use --parallel_backend torch")
        return super().token_range(n)

    def self_attention(self, qkv: list[torch.Tensor], seq_len: int) -> torch.Tensor:
        q, k, v = qkv
        qkv.clear()
        # (B, S/P, H, d) in and out; the first argument is xfuser's KV-cache layer (unused here)
        return self.attn(None, q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=False)
