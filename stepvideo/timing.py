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


# --- copies: what a forward writes without computing anything --------------------------------

COPY_OPS = ("copy_", "clone", "cat", "stack", "_to_copy", "constant_pad_nd")
# Ops that return a view or a copy: a copy when the output does not share its input's storage
# (under inference mode the dispatcher hands them over whole, so their inner clone is not seen).
VIEW_OR_COPY_OPS = ("reshape", "contiguous", "to", "flatten", "unflatten", "type_as", "reshape_as")


class OpCensus:
    """Counts the aten ops a region runs (``with OpCensus() as c: ...``) as the Python dispatcher
    sees them: ``ops`` name -> calls and ``written`` name -> bytes written (new outputs and
    in-place results; views write nothing). Copies
    (``COPY_OPS``, and ``VIEW_OR_COPY_OPS`` that did copy: ``.contiguous()`` of a strided tensor,
    a ``reshape`` that cannot be a view, a dtype cast) are also listed by the ``stepvideo`` source
    line that issued them, in ``copy_sites``; ``copies``/``copy_bytes`` sum them. Copies inside
    one kernel (an SDPA backend's own) are not seen; torch.profiler shows those."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        census = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                census._record(func, args, out)
                return out

        self._mode = _Mode()
        self.ops: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.copy_sites: dict[str, dict] = {}

    def __enter__(self) -> "OpCensus":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _record(self, func, args, out) -> None:
        name = func.__name__.split(".")[0]
        outs = _tensors(out)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors(list(args))}
        fresh = bool(outs) and outs[0].untyped_storage().data_ptr() not in inputs
        # bytes written: a new tensor's, or an in-place op's; a view writes nothing
        nbytes = sum(t.numel() * t.element_size() for t in outs) if fresh or name.endswith("_") else 0
        if name in VIEW_OR_COPY_OPS and fresh:
            name = f"{name} (copied)"
        self.ops[name] = self.ops.get(name, 0) + 1
        self.written[name] = self.written.get(name, 0) + nbytes
        if name in COPY_OPS or name.endswith(" (copied)"):
            site = self.copy_sites.setdefault(f"{name} at {_caller()}", {"calls": 0, "bytes": 0})
            site["calls"] += 1
            site["bytes"] += nbytes

    @property
    def copies(self) -> int:
        return sum(site["calls"] for site in self.copy_sites.values())

    @property
    def copy_bytes(self) -> int:
        return sum(site["bytes"] for site in self.copy_sites.values())


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def _caller() -> str:
    """``file:line (function)`` of the innermost ``stepvideo`` frame on the Python stack, skipping
    this module."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/stepvideo/" in path and not path.endswith("/timing.py"):
            short = path[path.rindex("/stepvideo/") + 1:]
            return f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "outside stepvideo"
