"""What the benchmarks measure with: the device's name, synchronised wall times and peak memory.

Used by ``benchmark/perf/*.py``; achieved TFLOP/s divide ``stepvideo.flops`` counts by these times.
"""

from __future__ import annotations

import platform
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports ru_maxrss in KiB; POSIX only)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_gb(device: torch.device) -> tuple[str, float]:
    """CUDA: max allocated since the last reset. CPU: the process RSS high-water (cumulative)."""
    if device.type == "cuda":
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(device) / 2 ** 30
    return "process_rss_high_water", peak_rss_bytes() / 2 ** 30


def time_call(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls after ``warmup`` untimed ones, synchronised on CUDA."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    return times


def markers(name: str) -> tuple[str, str]:
    """The HTML comments that fence a generated block of a README (``name``: e.g. speed-table)."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_block(path, name: str, text: str) -> None:
    """Rewrite the block fenced by ``markers(name)`` in the file at ``path`` with ``text`` (a
    benchmark's table regenerated from its saved JSON); the rest of the file is kept as it is."""
    from pathlib import Path

    path = Path(path)
    begin, end = markers(name)
    content = path.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{path} has no {begin} ... {end} block to replace")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
