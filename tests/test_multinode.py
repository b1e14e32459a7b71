"""Past one node on 127.0.0.1: two ``torchrun --nnodes 2 --nproc_per_node 1`` launches meeting at a
c10d rendezvous make the same video as one ``--nproc_per_node 2`` launch (Ulysses 2, CFG 2), and
the rule that keeps Ulysses groups inside a node."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from stepvideo.parallel import LaunchEnv, ParallelConfig
from stepvideo.video_io import read_frames
from tests.helpers import ROOT, free_port, running_service

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SIZE = ["--num_frames", "17", "--height", "64", "--width", "64", "--infer_steps", "2"]


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("service") / "server.log"
    with running_service(tiny_model_dir, log=log) as (_, url):
        yield url.removeprefix("http://")


def cli_args(model_dir: str, url: str, save: Path, degrees: list[str]) -> list[str]:
    return [str(ROOT / "run_parallel.py"), "--model_dir", model_dir, "--vae_url", url,
            "--caption_url", url, "--prompt", "a lighthouse in a storm", "--seed", "5",
            "--save_path", str(save), "--no_denoise_filter", *SIZE, *degrees]


def one_node(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)


def two_nodes(args: list[str]) -> list[subprocess.CompletedProcess]:
    """Both "nodes" started at once, as a cluster would: a c10d rendezvous on 127.0.0.1."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
               "--rdzv_endpoint", endpoint, "--rdzv_id", run_id, "--local_addr", "127.0.0.1",
               *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=ENV))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("degrees", [["--ulysses_degree", "2"], ["--cfg_parallel"]],
                         ids=["ulysses2", "cfg2"])
def test_two_nodes_make_the_same_video(degrees, tiny_model_dir, service, tmp_path):
    ref = one_node(cli_args(tiny_model_dir, service, tmp_path / "one", degrees))
    assert ref.returncode == 0, ref.stderr[-3000:]
    runs = two_nodes(cli_args(tiny_model_dir, service, tmp_path / "two", degrees))
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    wrote = [r for r in runs if "wrote " in r.stdout]
    assert len(wrote) == 1, "exactly one process (global rank 0) writes"
    if degrees[0] == "--ulysses_degree":  # 1 process per node: the all-to-all crosses nodes
        assert "Ulysses groups span nodes" in "".join(r.stderr for r in runs)
    a = read_frames(next((tmp_path / "one").glob("*.mp4")))
    b = read_frames(next((tmp_path / "two").glob("*.mp4")))
    assert a.shape == b.shape == (17, 64, 64, 3)
    assert np.array_equal(a, b)


def test_ulysses_stays_inside_a_node_rule():
    """Ulysses groups are runs of consecutive ranks; a node holds LOCAL_WORLD_SIZE of them."""
    rule = ParallelConfig.node_layout_note
    assert rule(ParallelConfig(ulysses_degree=8), 8, 8) is None                 # one node
    assert rule(ParallelConfig(ulysses_degree=8, cfg_degree=2), 8, 16) is None  # cfg spans
    assert rule(ParallelConfig(ulysses_degree=4, ring_degree=4), 8, 16) is None
    note = rule(ParallelConfig(ulysses_degree=16), 8, 16)
    assert "ulysses degree 16 does not divide the 8 processes per node" in note
    assert "[2, 4, 8]" in note
    assert "span nodes" in rule(ParallelConfig(ulysses_degree=3, ring_degree=2), 4, 6)
    note = rule(ParallelConfig(ulysses_degree=2, tensor_parallel_degree=4), 4, 8)
    assert "ulysses 2 x tensor_parallel 4 = 8 does not divide the 4 processes" in note
    # every Ulysses group of an accepted layout lies inside one node
    cfg, per_node = ParallelConfig(ulysses_degree=4, ring_degree=2, cfg_degree=2), 8
    for rank in range(cfg.world_size):
        peer = rank - cfg.coords(rank)["ulysses"]  # the group's first rank
        assert peer // per_node == rank // per_node


def test_launch_env_reads_local_world_size(monkeypatch):
    for k, v in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    env = LaunchEnv.from_environ()
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.nodes) == \
        (5, 1, 8, 4, 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert LaunchEnv.from_environ().nodes == 1
