"""A device-independent activation meter: the peak bytes of tensors born while a function runs.

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
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
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
