"""What the ATen ops of a region allocate, seen from a ``TorchDispatchMode``, on any device:
``LiveBytes`` / ``peak_live_bytes`` (the activation peak) and ``OpCensus`` (op counts, bytes
written and copies by source line).

A device-independent activation meter: the peak bytes of tensors born while a function runs.

``peak_live_bytes(fn)`` runs ``fn`` under a ``TorchDispatchMode`` that sees every ATen op's output
storage. A storage that does not alias one of the op's inputs is newly allocated: its bytes are
added to a running total, and a ``weakref.finalize`` on the storage takes them off when the
storage is freed (PyTorch keeps one Python object per live storage, so the finalizer fires when
the C++ storage dies, not when a wrapper does). The high-water mark of that total is the peak.
Weights, inputs and anything else that existed before the call are never counted (a view of a
weight, ``weight.t()`` inside ``nn.Linear``, aliases its input); in-place and ``out=`` ops return
storages of their inputs, so they add nothing.

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: it works on the CPU in torch 2.13 and
uses the same storage weakrefs (its "Activation" peak matches this one on a DiT block), but it
counts any storage on first sight in an op's output, so a view of a plain input tensor, or of a
weight of a module it has not hooked, becomes an "activation"; it also installs global module
hooks and lives in a private ``torch.distributed`` package. The profiler's memory events
(``torch.profiler``, as ``tests/test_vae.py`` reads them) need a private result API and count the
CPU kernels' internal buffers too, which are device-specific.

What the number means on another device. The same ops allocate the same output tensors on the
CPU and on CUDA, so this peak is the device-independent part of an activation peak. Not included:
(1) kernel workspaces allocated inside one op (cuBLAS/cuDNN workspaces, flash-attention's
internal buffers; on the CPU, SDPA's flash kernel's per-thread scratch), because they are not op
outputs; attention kernels also differ by device (CPU SDPA flash vs cuDNN / FlashAttention), and
their logsumexp outputs differ in dtype and shape; (2) the caching allocator's rounding (CUDA
rounds each block up to 512 bytes, and large blocks to 2 MiB segments) and fragmentation. So a
CUDA ``max_memory_allocated`` is this number plus workspaces plus rounding, and reserved memory is
more again.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages allocated by ATen ops under this mode, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = None             # the ATen op whose output set the peak
        self._tracked: dict[int, weakref.finalize] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storage_keys((args, kwargs))
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._tracked:
                continue
            nbytes = storage.nbytes()
            self._tracked[key] = weakref.finalize(storage, self._free, key, nbytes)
            self.live += nbytes
            if self.live > self.peak:
                self.peak, self.peak_op = self.live, func
        return out

    def __exit__(self, *exc):
        for fin in self._tracked.values():  # stop counting storages that outlive the mode
            fin.detach()
        self._tracked.clear()
        return super().__exit__(*exc)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _storage_keys(tree) -> set[int]:
    """The storages of the tensors in ``tree``: an op output whose storage is one of its inputs'
    is a view or an in-place/``out=`` result, not a new allocation."""
    return {t.untyped_storage()._cdata for t in _tensors(tree)}


def peak_live_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs (its result included while it is
    being built), excluding everything that existed before. Run it under ``torch.no_grad()`` to
    measure inference (autograd would keep the saved tensors alive)."""
    with LiveBytes() as meter:
        result = fn()
        del result
    return meter.peak


def dit_peak_bytes(model, inputs: dict, blocks: int | None = None) -> int:
    """Peak activation bytes of one DiT forward (``StepVideoModel``: embed -> the first ``blocks``
    blocks, all by default -> head) on ``inputs`` (``forward``'s keywords), weights excluded."""

    def run():
        e = model.embed(**inputs)
        return model.head(e, model.blocks(e, None, 0, blocks))

    with torch.no_grad():
        return peak_live_bytes(run)


# --- copies: what a forward writes without computing anything --------------------------------

COPY_OPS = ("copy_", "clone", "cat", "stack", "_to_copy", "constant_pad_nd")
# Ops that return a view or a copy: a copy when the output does not share its input's storage
# (under inference mode the dispatcher hands them over whole, so their inner clone is not seen).
VIEW_OR_COPY_OPS = ("reshape", "contiguous", "to", "flatten", "unflatten", "type_as", "reshape_as")


class OpCensus(TorchDispatchMode):
    """Counts the aten ops a region runs (``with OpCensus() as c: ...``) as the Python dispatcher
    sees them: ``ops`` name -> calls and ``written`` name -> bytes written (new outputs and
    in-place results; views write nothing). Copies
    (``COPY_OPS``, and ``VIEW_OR_COPY_OPS`` that did copy: ``.contiguous()`` of a strided tensor,
    a ``reshape`` that cannot be a view, a dtype cast) are also listed by the ``stepvideo`` source
    line that issued them, in ``copy_sites``; ``copies``/``copy_bytes`` sum them. Copies inside
    one kernel (an SDPA backend's own) are not seen; torch.profiler shows those."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.copy_sites: dict[str, dict] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._record(func, (args, kwargs), out)
        return out

    def _record(self, func, inputs, out) -> None:
        name = func.__name__.split(".")[0]
        outs = _tensors(out)
        fresh = bool(outs) and outs[0].untyped_storage()._cdata not in _storage_keys(inputs)
        # bytes written: a new tensor's, or a mutating op's (in place, out=); a view writes nothing
        writes = fresh or func._schema.is_mutable
        nbytes = sum(t.numel() * t.element_size() for t in outs) if writes else 0
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


def _caller() -> str:
    """``file:line (function)`` of the innermost ``stepvideo`` frame on the Python stack, skipping
    this module."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/stepvideo/" in path and not path.endswith("/memtrack.py"):
            short = path[path.rindex("/stepvideo/") + 1:]
            return f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "outside stepvideo"
