"""The parallel seam: process groups, the sequence-parallel plan, tensor-parallel linears and the
CFG split, behind ``setup_parallel``. ``backend='torch'`` (torch.distributed; gloo on CPU, NCCL on
GPUs) always works; ``backend='xfuser'`` uses xDiT's long-context attention on GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from typing import Callable

from .config import ParallelConfig
from ..modules.attention import LocalPlan

__all__ = ["ParallelConfig", "ParallelContext", "LocalPlan", "setup_parallel", "BACKENDS"]

BACKENDS = ("torch", "xfuser")


@dataclass
class ParallelContext:
    """What the runner needs from the parallel layer for one rank."""

    config: ParallelConfig
    rank: int = 0
    world_size: int = 1
    groups: object = None
    plan: object = field(default_factory=LocalPlan)
    velocity: Callable | None = None  # None: the single-group CFG velocity

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

    def apply(self, model) -> None:
        """Install the sequence plan and the tensor-parallel linears on a loaded DiT."""
        model.plan = self.plan
        if self.groups is not None:
            from .torch_backend import apply_tensor_parallel

            apply_tensor_parallel(model, self.groups)


def setup_parallel(config: ParallelConfig, num_heads: int, backend: str = "torch",
                   device: torch.device | str = "cpu",
                   timeout: timedelta = timedelta(minutes=30)) -> ParallelContext:
    """Validate the degrees against the launch, initialise the process groups and build the plan.

    ``timeout`` bounds every collective, including the wait while rank 0 checks the service.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config.validate(world, num_heads)
    if backend not in BACKENDS:
        raise ValueError(f"unknown parallel backend {backend!r}; choose one of {list(BACKENDS)}")
    if world == 1:
        return ParallelContext(config)
    import torch.distributed as dist

    device = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    rank = dist.get_rank()
    from .torch_backend import Groups, UlyssesPlan, cfg_parallel_velocity

    groups = Groups(config, rank)
    if config.sp_degree == 1:
        plan = LocalPlan()
    elif backend == "xfuser":
        from .xfuser_backend import XFuserPlan

        plan = XFuserPlan(groups)
    else:
        plan = UlyssesPlan(groups)
    velocity = cfg_parallel_velocity(groups) if config.cfg_degree == 2 else None
    return ParallelContext(config, rank, world, groups, plan, velocity)
