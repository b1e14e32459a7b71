"""Device and dtype names, resolved in one place for the runner, the service and the benchmarks.

Accepted dtype names: ``auto`` (bfloat16 on CUDA, float32 elsewhere: this CPU path computes in
float32), ``bfloat16``/``bf16``, ``float16``/``fp16``/``half``, ``float32``/``fp32``/``float``.
Accepted devices: ``auto`` (CUDA when visible), ``cpu``, ``cuda`` (this rank's ``LOCAL_RANK``) and
``cuda:N`` (one process only).
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The torch device for ``name``; ValueError with the fix when it cannot be used."""
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA device is visible; use cpu")
    if name.startswith("cuda:") and world_size > 1:
        raise ValueError(f"device {name} would put all {world_size} ranks on one GPU; pass cuda "
                         "(each rank takes its LOCAL_RANK) and choose GPUs with "
                         "CUDA_VISIBLE_DEVICES")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for ``name`` (see the module docstring); ``auto`` depends on ``device``."""
    if isinstance(name, torch.dtype):
        return name
    key = name.strip().lower()
    if key == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {list(DTYPE_CHOICES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
