"""Residency: which weights sit on the compute device, and when (``--offload none|model|block``).

Inference never changes a weight, so every model keeps one host copy of its tensors (pinned when
the compute device is CUDA) and "offloading" is dropping the device copy: nothing is copied back.

- ``HostWeights``: a module's tensors (or all but some sub-modules') swapped between their host
  copies and fresh device copies (``model`` mode moves a whole model around its stage).
- ``BlockStreamer``: the blocks of a ``ModuleList`` beyond the first ``resident`` are loaded on a
  side CUDA stream ``prefetch`` blocks ahead of use (forward pre-hooks) and dropped after their
  forward (forward hooks), cyclically, so a second forward (CFG run sequentially) starts with its
  first streamed block already in flight. Compute runs the same kernels in the same order as
  without offload: the output is bit-identical.
- ``Residency``: the pipeline's plan, one entry per model, entered around that model's stage.

On a CPU compute device nothing can move, but the same code runs: a "device copy" is a clone of
the host tensor, so the tests exercise every swap. Streams, events and pinned memory only appear
with a CUDA compute device.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

OFFLOAD_MODES = ("none", "model", "block", "auto")


@dataclass(frozen=True)
class OffloadConfig:
    """``mode``: none (every model on the device all the time), model (each model on the device
    only during its stage), block (model, and the DiT's blocks / Step-1's layers beyond the first
    ``resident_blocks`` streamed ``prefetch`` ahead). ``auto`` is resolved by the planner
    (``stepvideo.memory_plan``) before anything is loaded."""

    mode: str = "none"
    resident_blocks: int = 0
    prefetch: int = 1

    def __post_init__(self):
        if self.mode not in OFFLOAD_MODES:
            raise ValueError(f"--offload {self.mode!r} is not one of {', '.join(OFFLOAD_MODES)}")
        if self.resident_blocks < 0:
            raise ValueError(f"--resident_blocks must be >= 0, got {self.resident_blocks}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 block, got {self.prefetch}")


def _slots(module: nn.Module, skip: set[int] = frozenset()):
    """(owner, name, is_parameter) of every parameter and buffer, minus sub-modules in ``skip``."""
    out = []
    for mod in module.modules():
        if id(mod) in skip:
            continue
        out += [(mod, n, True) for n, p in mod._parameters.items() if p is not None]
        out += [(mod, n, False) for n, b in mod._buffers.items() if b is not None]
    return out


def _skip_ids(modules) -> set[int]:
    return {id(m) for top in modules for m in top.modules()}


def _pin(t: torch.Tensor) -> torch.Tensor:
    """A pinned copy, one tensor at a time (never a second copy of the whole model); tensors
    whose type cannot be pinned (some tensor subclasses) stay pageable."""
    if t.is_pinned():
        return t
    try:
        return t.pin_memory()
    except (RuntimeError, NotImplementedError, TypeError):
        return t


class HostWeights:
    """The tensors of ``module`` (minus ``skip`` sub-modules) with a host copy each; ``to_device``
    installs device copies, ``to_host`` reinstalls the host copies (the device copies are freed
    when nothing else holds them)."""

    def __init__(self, module: nn.Module, device: torch.device, skip=()):
        self.device = torch.device(device)
        self.slots = _slots(module, _skip_ids(skip))
        pin = self.device.type == "cuda"
        self.host = []
        for mod, name, is_param in self.slots:
            t = self._get(mod, name, is_param).detach()
            t = t.to("cpu") if t.device.type != "cpu" else t
            self.host.append(_pin(t) if pin else t)
        self.to_host()
        self.on_device = False

    @staticmethod
    def _get(mod, name, is_param):
        return mod._parameters[name] if is_param else mod._buffers[name]

    @staticmethod
    def _set(mod, name, is_param, t):
        if is_param and type(t) is torch.Tensor:
            mod._parameters[name].data = t  # the same Parameter object: compiled code keeps it
        elif is_param:  # a tensor subclass (torchao's Float8Tensor) cannot be set as .data
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[name] = t

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)

    def to_device(self, stream: "torch.cuda.Stream | None" = None) -> list[torch.Tensor]:
        """Install device copies (issued on ``stream`` when given); returns them."""
        copies = []
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        # Plain tensors even inside a stage's inference_mode: a tensor subclass parameter
        # (Float8Tensor) cannot be built from an inference tensor.
        with ctx, torch.inference_mode(False), torch.no_grad():
            for (mod, name, is_param), host in zip(self.slots, self.host):
                t = (host.clone() if self.device.type == "cpu"
                     else host.to(self.device, non_blocking=True))
                self._set(mod, name, is_param, t)
                copies.append(t)
        self.on_device = True
        return copies

    def to_host(self) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for (mod, name, is_param), host in zip(self.slots, self.host):
                self._set(mod, name, is_param, host)
        self.on_device = False


class BlockStreamer:
    """Stream ``blocks[resident:]`` through the compute device around their forward calls."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, resident: int = 0,
                 prefetch: int = 1):
        self.device = torch.device(device)
        self.resident = min(resident, len(blocks))
        self.prefetch = prefetch
        self.order = list(range(self.resident, len(blocks)))
        self.weights = {i: HostWeights(blocks[i], self.device) for i in self.order}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending: dict[int, tuple] = {}  # block -> (event or None, device copies)
        self.loads = 0
        self.handles = []
        for i in self.order:
            self.handles.append(blocks[i].register_forward_pre_hook(functools.partial(self._before, i)))
            self.handles.append(blocks[i].register_forward_hook(functools.partial(self._after, i)))

    def _load(self, i: int) -> None:
        if i in self.pending:
            return
        copies = self.weights[i].to_device(self.stream)
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = (event, copies)
        self.loads += 1

    # The hooks run eagerly under ``--compile`` (a compiled block calls them from its compiled
    # ``_call_impl``): traced, they would recompile for every block index and record the weight
    # swaps and stream calls into graphs.
    @torch.compiler.disable
    def _before(self, i: int, module, args) -> None:
        self._load(i)
        event, copies = self.pending.pop(i)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in copies:  # freed only after the compute stream is done with them
                t.record_stream(compute)
        pos = self.order.index(i)
        for k in range(1, self.prefetch + 1):
            nxt = self.order[(pos + k) % len(self.order)]
            if nxt != i:
                self._load(nxt)

    @torch.compiler.disable
    def _after(self, i: int, module, args, output) -> None:
        self.weights[i].to_host()

    def release(self) -> None:
        """Drop prefetched copies (end of a stage)."""
        for i in list(self.pending):
            self.weights[i].to_host()
        self.pending.clear()

    def remove(self, to_device: bool = True) -> None:
        self.release()
        for h in self.handles:
            h.remove()
        for w in self.weights.values() if to_device else ():
            w.to_device()


class _Entry:
    """One model under a residency plan: the part that moves as a whole and, in block mode, a
    streamer for its block list."""

    def __init__(self, module: nn.Module, device: torch.device, config: OffloadConfig,
                 blocks: nn.ModuleList | None):
        stream_blocks = config.mode == "block" and blocks is not None
        streamed = list(blocks[config.resident_blocks:]) if stream_blocks else []
        self.streamer = (BlockStreamer(blocks, device, config.resident_blocks, config.prefetch)
                         if stream_blocks else None)
        self.rest = HostWeights(module, device, skip=streamed)

    def enter(self) -> None:
        self.rest.to_device()

    def exit(self) -> None:
        if self.streamer is not None:
            self.streamer.release()
        self.rest.to_host()


class Residency:
    """The pipeline's residency plan: ``add(name, module, blocks)`` once per model, then
    ``with residency.active(name):`` around that model's stage. ``none`` moves every model to the
    device once and keeps it there."""

    def __init__(self, config: OffloadConfig, device: str | torch.device):
        if config.mode == "auto":
            raise ValueError("--offload auto must be resolved by stepvideo.memory_plan.plan() "
                             "before the models are placed")
        self.config, self.device = config, torch.device(device)
        self.entries: dict[str, _Entry] = {}

    def add(self, name: str, module: nn.Module, blocks: nn.ModuleList | None = None) -> None:
        if self.config.mode == "none":
            module.to(self.device)
            return
        self.entries[name] = _Entry(module, self.device, self.config, blocks)

    @contextlib.contextmanager
    def active(self, *names: str) -> Iterator[None]:
        entries = [self.entries[n] for n in names if n in self.entries]
        for e in entries:
            e.enter()
        try:
            yield
        finally:
            for e in entries:
                e.exit()

    def close(self, to_device: bool = True) -> None:
        """Undo the plan: hooks removed, every model's weights on the device for good (or, with
        ``to_device=False``, left on the host)."""
        for entry in self.entries.values():
            if entry.streamer is not None:
                entry.streamer.remove(to_device)
            if to_device:
                entry.rest.to_device()
        self.entries.clear()

    def streamer(self, name: str) -> BlockStreamer | None:
        entry = self.entries.get(name)
        return entry.streamer if entry is not None else None
