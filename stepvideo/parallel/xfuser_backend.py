"""GPU sequence parallelism through xDiT's attention engine (yunchang's hybrid Ulysses + ring
attention, which xfuser's ``xFuserLongContextAttention`` subclasses), with flash kernels.

Optional and GPU-only: imported only when ``--parallel_backend xfuser`` is chosen. The kernel is
chosen explicitly (``attn_type``), never left to a flash-only default, and the process groups are
ours (the same layout as the torch backend), handed to yunchang's globals. yunchang does not mask
padded keys, so this plan requires the token count to split evenly; the torch backend handles
uneven splits.
"""

from __future__ import annotations

import torch

from .torch_backend import Groups, UlyssesPlan

# yunchang AttnType values we allow: flash-attn 2, or PyTorch's flash / memory-efficient SDPA kernels.
ATTN_TYPES = ("fa", "torch_flash", "torch_efficient")


def default_attn_type() -> str:
    """flash-attn 2 when it imports, else PyTorch's flash kernel: always an explicit choice."""
    import importlib.util

    return "fa" if importlib.util.find_spec("flash_attn") is not None else "torch_flash"


def _import_yunchang():
    try:
        import yunchang
        from yunchang.globals import PROCESS_GROUP
        from yunchang.kernels import AttnType
    except ImportError as e:  # a clear error naming the fix, not a silent fallback
        raise RuntimeError(
            "--parallel_backend xfuser needs xfuser/yunchang on a CUDA machine "
            "(pip install 'stepvideo[gpu]'; see README for the tested versions). "
            f"Import failed: {e}. Use --parallel_backend torch instead.") from e
    return yunchang, PROCESS_GROUP, AttnType


class XFuserPlan(UlyssesPlan):
    """UlyssesPlan with the attention itself done by yunchang's LongContextAttention."""

    def __init__(self, groups: Groups, attn_type: str | None = None):
        super().__init__(groups)
        attn_type = attn_type or default_attn_type()
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
        yunchang, pg, attn_enum = _import_yunchang()
        pg.ULYSSES_PG, pg.RING_PG = groups.group("ulysses"), groups.group("ring")
        self.attn_type = attn_type
        self.attn = yunchang.LongContextAttention(ring_impl_type="basic",
                                                  attn_type=attn_enum.from_string(attn_type))

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.shape[dim] % self.world_size:
            raise ValueError(
                f"{x.shape[dim]} tokens do not split evenly over {self.world_size} sequence-parallel "
                "ranks, and the xfuser backend cannot mask padding; pick a size whose latent "
                "frames x height x width divide evenly, or use --parallel_backend torch")
        return super().shard(x, dim)

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       seq_len: int) -> torch.Tensor:
        return self.attn(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=False)
