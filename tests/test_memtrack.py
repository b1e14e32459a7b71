"""The activation meter (stepvideo.memtrack): exact peak of the bytes born under it."""

from __future__ import annotations

import pytest
import torch

from stepvideo.memtrack import peak_live_bytes


def test_peak_is_exact_on_a_known_allocation_pattern():
    """Frees count down, views/in-place/out= ops and tensors from before the call add nothing."""
    before = torch.ones(100)                           # exists already: never counted

    def pattern():
        a = torch.empty(1000)                          # 4,000 B
        b = torch.ones(2000, dtype=torch.float64)      # 16,000 B -> 20,000 live (the peak)
        b.view(40, 50).add_(1)                         # a view and an in-place op: 0
        torch.mul(b, 2, out=b)                         # out= into b: 0
        before.t()                                     # a view of an older tensor: 0
        del a                                          # 16,000 live
        c = torch.empty(3000, dtype=torch.int8)        # 19,000
        d = before + 1                                 # 19,400
        del b                                          # 3,400
        e = torch.empty(4000)                          # 19,400
        return c, d, e

    assert peak_live_bytes(pattern) == 20_000

    def sequential():
        for _ in range(3):
            x = torch.empty(1 << 20, dtype=torch.uint8)  # each freed before the next
            del x
        return torch.empty(10, dtype=torch.uint8)

    assert peak_live_bytes(sequential) == (1 << 20) + 0  # the result comes after the last free


def test_agrees_with_pytorch_mem_tracker_on_a_module():
    """On an MLP whose input is never viewed, PyTorch's MemTracker "Activation" peak is the same."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(32, 64)
    with torch.no_grad():
        ours = peak_live_bytes(lambda: mlp(x))
        tracker = mem_tracker.MemTracker()
        with tracker:
            mlp(x)
    theirs = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    act = next(v for k, v in theirs.items() if getattr(k, "value", k) == "Activation")
    # hidden (32 x 256) and its GELU are live together: 2 x 32 x 256 x 4 bytes
    assert ours == act == 2 * 32 * 256 * 4
