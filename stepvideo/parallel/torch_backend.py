"""torch.distributed backend of the parallel layer: Ulysses (+ a gathered-KV ring), tensor
parallel linears and the CFG split. NCCL on GPUs, gloo on CPU.

The model is untouched: ``UlyssesPlan`` replaces ``model.plan`` (shard tokens after patchify,
gather before the final layer, all-to-all around self-attention) and ``apply_tensor_parallel``
swaps linears for sharded wrappers, as gpt-fast's tp.py does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from ..conditioning import TextEmbeddings
from ..modules.attention import attention
from .config import ParallelConfig
from .context import CfgSplit


class Groups:
    """Process groups of one rank: sequence (ulysses, ring, both), tensor, cfg."""

    def __init__(self, cfg: ParallelConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self.coords = cfg.coords(rank)
        world = cfg.world_size
        u = cfg.ulysses_degree
        by = {"ulysses": [], "ring": [], "sp": [], "tp": [], "cfg": []}
        for rk in range(world):  # every rank creates every group, in the same order
            c = cfg.coords(rk)
            key = {"ulysses": (c["ring"], c["tp"], c["cfg"]), "ring": (c["ulysses"], c["tp"], c["cfg"]),
                   "sp": (c["tp"], c["cfg"]), "tp": (c["ulysses"], c["ring"], c["cfg"]),
                   "cfg": (c["ulysses"], c["ring"], c["tp"])}
            for name, k in key.items():
                by[name].append((k, rk))
        self.groups = {}
        for name, pairs in by.items():
            keys = sorted({k for k, _ in pairs})
            for k in keys:
                members = [rk for kk, rk in pairs if kk == k]
                g = dist.new_group(members)
                if rank in members:
                    self.groups[name] = (g, members)
        self.sp_rank = self.coords["ring"] * u + self.coords["ulysses"]

    def group(self, name: str):
        return self.groups[name][0]

    def size(self, name: str) -> int:
        return len(self.groups[name][1])


def _all_to_all_async(out: torch.Tensor, x: torch.Tensor, group):
    """Start exchanging equal chunks of dim 0 of the contiguous ``x`` between the ranks of
    ``group`` (rank r receives every rank's chunk r into ``out``, in rank order); returns the work."""
    return dist.all_to_all_single(out, x, group=group, async_op=True)


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


class UlyssesPlan:
    """Sequence parallelism over ``ulysses x ring`` ranks.

    Tokens are split evenly (zero-padded at the end when the count does not divide); padded keys
    are cut from self-attention and padded rows dropped by ``gather``, so padding changes nothing.
    The plan holds no per-call state: the model passes the unpadded token count ``seq_len`` to
    ``self_attention`` and ``gather``. Self-attention: all-to-all (B, S/U, H, d) -> (B, S, H/U, d)
    over the ulysses group;
    across the ring group the keys and values are all-gathered (exact, not memory-bounded: the
    xfuser backend provides the true ring kernel on GPUs).
    """

    def __init__(self, groups: Groups):
        self.g = groups
        self.world_size = groups.cfg.sp_degree

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's ``token_range`` of x along ``dim``, zero-padded to the common size."""
        start, stop, size = self.token_range(x.shape[dim])
        part = x.narrow(dim, start, stop - start)
        if stop - start < size:
            pad_shape = list(x.shape)
            pad_shape[dim] = size - (stop - start)
            part = torch.cat([part, x.new_zeros(pad_shape)], dim=dim)
        return part.contiguous()

    def token_range(self, n: int) -> tuple[int, int, int]:
        """(start, stop, size): the tokens [start, stop) of n that ``shard`` gives this rank,
        zero-padded to size."""
        size = -(-n // self.world_size)
        start = min(self.g.sp_rank * size, n)
        return start, min(start + size, n), size

    def gather(self, x: torch.Tensor, dim: int, seq_len: int) -> torch.Tensor:
        x = _all_gather(x, self.g.group("ulysses"), dim) if self.g.size("ulysses") > 1 else x
        x = _all_gather(x, self.g.group("ring"), dim) if self.g.size("ring") > 1 else x
        return x.narrow(dim, 0, seq_len)

    def self_attention(self, qkv: list[torch.Tensor], seq_len: int) -> torch.Tensor:
        """Ulysses: q, k, v (B, S/U, H, d) go out per sample as (U, S/U, H/U, d), chunk i (the
        heads of rank i) to rank i, and come back as (U, S/U, H/U, d) = (S, H/U, d), a view
        attention reads as is. ``qkv`` is emptied as its tensors are packed, so the caller's
        projection is freed before any exchange. Every exchange is started at once: sample i's
        attention runs as soon as its q, k, v have arrived, while later samples are still in
        flight, and its output goes back while the next sample's attention runs. One copy per
        tensor each way (the head-chunk-major send buffer of q, k, v; the token-major output for
        ``wo``)."""
        u = self.g.size("ulysses")
        if u == 1:
            q, k, v = qkv
            qkv.clear()
            return self._attend(q, k, v, seq_len)
        group = self.g.group("ulysses")
        b, s, heads, d = qkv[0].shape
        sent = []  # [v, k, q][sample]: (U, S/U, H/U, d) send buffers, one per sample so each is
        while qkv:  # freed once its exchange is done; each popped tensor is released once packed
            t = qkv.pop()
            sent.append([rearrange(t[i], "s (u h) d -> u s h d", u=u).contiguous() for i in range(b)])
            del t
        got = [[torch.empty_like(x) for x in per_sample] for per_sample in sent]
        works = [[_all_to_all_async(r, x, group) for r, x in zip(rs, xs)] for rs, xs in zip(got, sent)]
        back = None  # (B, U, S/U, H/U, d), sample i: rank j's heads of this rank's tokens
        returns = []
        for i in range(b):
            for j in range(3):  # the work holds its buffers too
                works[j][i].wait()
                works[j][i] = sent[j][i] = None
            vi, ki, qi = (r[i].view(1, u * s, heads // u, d) for r in got)  # (1, S, H/U, d)
            for r in got:
                r[i] = None
            out = self._attend(qi, ki, vi, seq_len).contiguous().view(u, s, heads // u, d)
            del qi, ki, vi
            if back is None:  # allocated once sample 0's buffers are free
                back = out.new_empty(b, u, s, heads // u, d)
            returns.append((_all_to_all_async(back[i], out, group), out))  # out kept until sent
        for w, _ in returns:
            w.wait()
        return rearrange(back, "b u s h d -> b s (u h) d")  # (B, S/U, H, d)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                seq_len: int) -> torch.Tensor:
        """Attention of this rank's heads over all tokens; across the ring group the keys and
        values are all-gathered first."""
        if self.g.size("ring") > 1:
            k = _all_gather(k, self.g.group("ring"), 1)
            v = _all_gather(v, self.g.group("ring"), 1)
        # Padded tokens sit at the end of the full sequence: drop them as keys (queries on padding
        # are computed and later discarded by gather).
        return attention(q, k[:, :seq_len], v[:, :seq_len])


class ColumnParallelLinear(nn.Module):
    """Holds the rank's slice of output features; output stays sharded."""

    def __init__(self, linear: nn.Linear, rank: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().chunk(size, 0)[rank].clone(),
                                   requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().chunk(size, 0)[rank].clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Holds the rank's slice of input features; partial outputs are all-reduced."""

    def __init__(self, linear: nn.Linear, rank: int, size: int, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(linear.weight.detach().chunk(size, 1)[rank].clone(),
                                   requires_grad=False)
        if linear.bias is not None:
            raise ValueError("row-parallel linears here have no bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out


def apply_tensor_parallel(model: nn.Module, groups: Groups) -> None:
    """Shard every block's attention heads and MLP hidden units over the tensor-parallel group
    (``shard_blocks`` with this rank's coordinates)."""
    size = groups.size("tp")
    if size > 1:
        shard_blocks(model, groups.coords["tp"], size, groups.group("tp"))


def shard_blocks(model: nn.Module, rank: int, size: int, group=None) -> None:
    """Replace each block's projections with slice ``rank`` of ``size``: column-parallel for
    q/k/v and the MLP's first layer, row-parallel (all-reduced over ``group``) for the output
    projections. Fused projections are laid out per head ([q_h|k_h|v_h], [k_h|v_h]), so contiguous
    row slices hold whole heads and the attention code needs no change. Works on the meta device
    (the memory planner's per-rank weight bytes)."""
    for block in model.transformer_blocks:
        a1, a2, ff = block.attn1, block.attn2, block.ff
        a1.wqkv = ColumnParallelLinear(a1.wqkv, rank, size)
        a1.wo = RowParallelLinear(a1.wo, rank, size, group)
        a2.wq = ColumnParallelLinear(a2.wq, rank, size)
        a2.wkv = ColumnParallelLinear(a2.wkv, rank, size)
        a2.wo = RowParallelLinear(a2.wo, rank, size, group)
        ff.net[0].proj = ColumnParallelLinear(ff.net[0].proj, rank, size)
        ff.net[2] = RowParallelLinear(ff.net[2], rank, size, group)


class CfgParallel(CfgSplit):
    """Each CFG group runs its half of [positive, negative]; the velocity halves are exchanged,
    halving each rank's DiT work."""

    def __init__(self, groups: Groups):
        self.index, self.group = groups.coords["cfg"], groups.group("cfg")
        self.source = groups.groups["cfg"][1][0]  # the global rank of this pair's positive half

    def local(self, text: TextEmbeddings) -> TextEmbeddings:
        b = text.y.shape[0] // 2
        return text.select(slice(self.index * b, (self.index + 1) * b))

    def gather(self, v: torch.Tensor) -> torch.Tensor:
        return _all_gather(v, self.group, 0)

    def share_positive(self, v: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        buf = v.contiguous() if self.index == 0 else torch.empty_like(like)
        dist.broadcast(buf, self.source, group=self.group)
        return buf
