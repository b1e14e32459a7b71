"""The parallel seam: process groups, the sequence-parallel plan, tensor-parallel linears and the
CFG split, behind ``setup_parallel``. ``backend='torch'`` (torch.distributed; gloo on CPU, NCCL on
GPUs) always works; ``backend='xfuser'`` uses xfuser's (xDiT's) distributed environment and
long-context attention on GPUs (``xfuser_backend``: CUDA and the pinned xfuser 0.4.5 + yunchang
0.6.4, checked first)."""

from __future__ import annotations

import socket
from datetime import timedelta

import torch

from ..modules.attention import LocalPlan
from .config import ParallelConfig
from .context import CfgSplit, LaunchEnv, ParallelContext

__all__ = ["BACKENDS", "CfgSplit", "LaunchEnv", "LocalPlan", "ParallelConfig", "ParallelContext",
           "free_port", "setup_parallel"]

BACKENDS = ("torch", "xfuser")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a torchrun rendezvous or a local service)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def setup_parallel(config: ParallelConfig, num_heads: int, backend: str = "torch",
                   device: torch.device | str = "cpu", env: LaunchEnv | None = None,
                   timeout: timedelta = timedelta(minutes=30)) -> ParallelContext:
    """Validate the degrees against the launch (the one check: ValueError with the numbers),
    initialise the process groups and build the plan.

    ``timeout`` bounds every collective, including the wait while rank 0 checks the service.
    """
    env = env or LaunchEnv.from_environ()
    config.validate(env.world_size, num_heads)
    if backend not in BACKENDS:
        raise ValueError(f"unknown parallel backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "xfuser":  # before any process group: CUDA, versions, degrees
        from .xfuser_backend import check_xfuser

        check_xfuser(config, device)
    if env.world_size == 1:
        return ParallelContext(config, env)
    note = config.node_layout_note(env.local_world_size, env.world_size)
    import torch.distributed as dist

    device = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    from .torch_backend import CfgParallel, Groups, UlyssesPlan, apply_tensor_parallel

    groups = Groups(config, env.rank)
    if config.sp_degree == 1:
        plan = LocalPlan()
    elif backend == "xfuser":
        from .xfuser_backend import XFuserPlan

        plan = XFuserPlan(groups, env)
    else:
        plan = UlyssesPlan(groups)
    cfg = CfgParallel(groups) if config.cfg_degree == 2 else None
    return ParallelContext(config, env, groups, plan, cfg,
                           lambda model: apply_tensor_parallel(model, groups),
                           [note] if note else [])
