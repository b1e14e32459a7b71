"""Parallel parity with real torchrun processes (gloo on 127.0.0.1) on the tiny model at batch 2:
2-rank Ulysses, ring, tensor and CFG parallel, and 4-rank Ulysses x ring/tensor/CFG, each reproduce the
single-process latents; a rank given another shard's RoPE positions must not; Ulysses attention is exact
and copies each tensor once each way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepvideo.modules.attention import attention
from stepvideo.parallel import ParallelConfig, free_port
from stepvideo.tiny import write_tiny_model
from tests.ulysses_worker import BATCH, TOKENS, qkv

WORKER = str(Path(__file__).with_name("dist_worker.py"))
# Tokens per sample = 3 x 3 x 5 = 45, odd: the 2-way split pads one token, which must change nothing.
SHAPE = ["--frames", "3", "--h", "3", "--w", "5", "--batch", "2", "--steps", "2"]


def _run(args, nproc: int, out: Path) -> torch.Tensor:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, WORKER]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))["latents"]


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory):
    """The tiny model's DiT, written in the official layout (4 heads of 128, 2 layers)."""
    root = tmp_path_factory.mktemp("tiny") / "model"
    write_tiny_model(str(root))
    return root / "transformer"


@pytest.fixture(scope="module")
def reference(transformer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    return _run([str(transformer_dir), str(out), *SHAPE], 1, out)


@pytest.mark.parametrize("degrees", [["--ulysses", "2"], ["--ring", "2"], ["--tp", "2"], ["--cfg", "2"]],
                         ids=["ulysses", "ring", "tensor", "cfg"])
def test_two_ranks_match_single_process(degrees, transformer_dir, reference, tmp_path):
    out = tmp_path / "par.safetensors"
    got = _run([str(transformer_dir), str(out), *SHAPE, *degrees], 2, out)
    assert reference.shape[0] == 2 and got.shape == reference.shape
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("degrees", [["--ulysses", "2", "--ring", "2"], ["--ulysses", "2", "--tp", "2"],
                                     ["--ulysses", "2", "--cfg", "2"]],
                         ids=["ulysses-x-ring", "ulysses-x-tensor", "ulysses-x-cfg"])
def test_four_ranks_hybrid(degrees, transformer_dir, reference, tmp_path):
    """Hybrid layouts on 4 ranks (the tiny DiT has 4 heads); 45 tokens are padded to 48 or 46."""
    out = tmp_path / "hybrid.safetensors"
    got = _run([str(transformer_dir), str(out), *SHAPE, *degrees], 4, out)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-5)


def test_wrong_rope_positions_break_parity(transformer_dir, reference, tmp_path):
    out = tmp_path / "bad.safetensors"
    got = _run([str(transformer_dir), str(out), *SHAPE, "--ulysses", "2", "--wrong-rope"], 2, out)
    assert (got - reference).abs().max() > 1e-2


def test_degree_validation_messages():
    with pytest.raises(ValueError, match=r"48 heads are not divisible by ulysses degree 7"):
        ParallelConfig(ulysses_degree=7).validate(7, 48)
    with pytest.raises(ValueError, match=r"world size 8 != ulysses 2 x ring 1 x tensor_parallel 2 x cfg 1 = 4"):
        ParallelConfig(ulysses_degree=2, tensor_parallel_degree=2).validate(8, 48)
    with pytest.raises(ValueError, match="cfg degree must be 1 or 2"):
        ParallelConfig(cfg_degree=3)
    ParallelConfig(ulysses_degree=4, cfg_degree=2).validate(8, 48)
    cfg = ParallelConfig(ulysses_degree=2, ring_degree=2, tensor_parallel_degree=2, cfg_degree=2)
    assert [cfg.coords(r)["ulysses"] for r in range(4)] == [0, 1, 0, 1]
    assert cfg.coords(15) == {"ulysses": 1, "ring": 1, "tp": 1, "cfg": 1}


def test_ulysses_attention_is_exact_with_one_layout_copy_per_tensor_each_way(tmp_path):
    """2-rank Ulysses self-attention at batch 2 with a padded split equals one process's attention,
    and copies each of q, k, v once (into the head-chunk-major send buffers, one per sample so
    each is freed once sent: 3 x batch copy ops) and the output once (back to token-major for
    ``wo``): 4 q-sized shards of bytes. The all-to-all layout used to copy each tensor before and
    after the exchange (8 shards)."""
    prefix = tmp_path / "uly"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(Path(__file__).with_name("ulysses_worker.py")), str(prefix)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"uly.{r}.safetensors")) for r in range(2)]
    got = torch.cat([r["out"] for r in ranks], dim=1)[:, :TOKENS]  # drop the padded query
    # The same kernel on the same 45 keys per sample and head: equal up to the kernel's summation
    # order, a few ulp of fp32 on outputs of size ~1 (2 ranks gave bit-equal results on CPU).
    torch.testing.assert_close(got, attention(*qkv()), atol=1e-5, rtol=1e-5)
    for r in ranks:
        assert int(r["copies"]) == 3 * BATCH + 1
        assert int(r["copy_bytes"]) == 4 * int(r["q_bytes"])
