"""Run by tests under ``torchrun``: one Ulysses self-attention of seeded q, k, v (2 samples, 45
tokens, padded to an even split) under ``OpCensus``; saves this rank's output and copy counts.

Usage: ulysses_worker.py OUT_PREFIX   (writes OUT_PREFIX.RANK.safetensors)
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from stepvideo.parallel import ParallelConfig
from stepvideo.parallel.torch_backend import Groups, UlyssesPlan
from stepvideo.memtrack import OpCensus

BATCH, TOKENS, HEADS, HEAD_DIM = 2, 45, 4, 128


def qkv() -> list[torch.Tensor]:
    """The unsharded q, k, v (B, S, H, d), the same on every rank and in the test."""
    g = torch.Generator().manual_seed(5)
    return [torch.randn(BATCH, TOKENS, HEADS, HEAD_DIM, generator=g) for _ in range(3)]


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = UlyssesPlan(Groups(ParallelConfig(ulysses_degree=world), rank))
    q, k, v = (plan.shard(t, 1) for t in qkv())
    with torch.inference_mode(), OpCensus() as census:
        out = plan.self_attention([q, k, v], TOKENS)
    save_file({"out": out.contiguous(), "copies": torch.tensor(census.copies),
               "copy_bytes": torch.tensor(census.copy_bytes),
               "q_bytes": torch.tensor(q.numel() * q.element_size())},
              f"{sys.argv[1]}.{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
