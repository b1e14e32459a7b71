"""What one rank knows about the launch and its parallel layout: ``LaunchEnv`` (torchrun's
environment, read once), ``ParallelContext`` (plan, groups, CFG split, broadcasts) and the CFG split
interface the pipeline's velocity uses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..conditioning import TextEmbeddings
from ..modules.attention import LocalPlan, SequencePlan
from .config import ParallelConfig


@dataclass(frozen=True)
class LaunchEnv:
    """Where torchrun put this process (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``); read once. ``rank`` is global (rank 0 talks to the services and
    writes), ``local_rank`` picks the GPU on this node. torchrun numbers the ranks of one node
    consecutively, so ``local_world_size`` (the processes per node) decides which process groups
    stay inside a node. Without ``LOCAL_WORLD_SIZE`` (not torchrun) one node is assumed."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_environ(cls) -> "LaunchEnv":
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), world,
                   int(env.get("LOCAL_WORLD_SIZE", str(world))))

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


class CfgSplit:
    """What a CFG-parallel rank does to a [positive, negative] batch: keep its half of the text
    before the DiT (``local``) and collect both halves of the velocity after it (``gather``).
    ``index`` is the half this rank runs (0 positive, 1 negative); when only the positive branch
    runs (CFG truncation), ``share_positive`` hands group 0's velocity to every rank."""

    index = 0

    def local(self, text: TextEmbeddings) -> TextEmbeddings:
        return text

    def gather(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def share_positive(self, v: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Group 0's ``v``; ranks of group 1 pass None and a tensor of its shape and dtype."""
        return v


@dataclass
class ParallelContext:
    """What the runner needs from the parallel layer for one rank."""

    config: ParallelConfig
    env: LaunchEnv = field(default_factory=LaunchEnv)
    groups: object = None
    plan: SequencePlan = field(default_factory=LocalPlan)
    cfg: CfgSplit | None = None  # None: both CFG halves on this rank
    shard_linears: Callable[[torch.nn.Module], None] | None = None  # tensor parallelism
    notes: list[str] = field(default_factory=list)  # layout advice, printed once by rank 0

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_ints(self, values: list[int] | None, device: torch.device) -> list[int]:
        """Rank 0's list of integers on every rank (length first, then the values; no pickling)."""
        if self.world_size == 1:
            return list(values)
        n = self.broadcast_tensor(torch.tensor([len(values) if self.is_main else 0]), device)
        buf = torch.tensor(values, dtype=torch.long) if self.is_main else torch.zeros(int(n), dtype=torch.long)
        return self.broadcast_tensor(buf, device).tolist() if len(buf) else []

    def broadcast_tensor(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rank 0's ``tensor`` (others pass one of the same shape and dtype), on the communication
        device: ``device`` for NCCL, the CPU for gloo."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        comm = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
        tensor = tensor.contiguous().to(comm)
        dist.broadcast(tensor, 0)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The sum of ``tensor`` over all ranks, the same on every rank (the step cache adds its
        distances with it so that every rank takes the same decision)."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        comm = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
        tensor = tensor.contiguous().to(comm)
        dist.all_reduce(tensor)
        return tensor.cpu()

    def gather_to_main(self, tensor: torch.Tensor,
                       device: torch.device) -> list[torch.Tensor] | None:
        """Every rank's ``tensor`` (same shape and dtype on all ranks), as a list by rank on rank 0
        and None elsewhere; sent over the communication device (``device`` for NCCL, else CPU)."""
        if self.world_size == 1:
            return [tensor]
        import torch.distributed as dist

        comm = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
        tensor = tensor.contiguous().to(comm)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(tensor, out, dst=0)
        return out

    def broadcast_text(self, text: TextEmbeddings | None, device: torch.device,
                       dtype: torch.dtype) -> TextEmbeddings:
        """Rank 0's embeddings on every rank (shapes first, then the tensors; no pickling)."""
        if self.world_size == 1:
            return text.to(device, dtype)
        shapes = [*text.y.shape, *text.clip.shape[1:]] if self.is_main else None
        n, ly, dy, lc, dc = self.broadcast_ints(shapes, device)
        if not self.is_main:
            text = TextEmbeddings(torch.empty(n, ly, dy), torch.empty(n, lc + ly),
                                  torch.empty(n, lc, dc))
        parts = [self.broadcast_tensor(t.float(), device) for t in (text.y, text.mask, text.clip)]
        return TextEmbeddings(*parts).to(device, dtype)

    def apply(self, model) -> None:
        """Install the sequence plan and the tensor-parallel linears on a loaded DiT."""
        model.plan = self.plan
        if self.shard_linears is not None:
            self.shard_linears(model)

    def close(self) -> None:
        """Wait for every rank, then tear the process groups down."""
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
