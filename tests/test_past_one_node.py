"""Past one node, with real processes on 127.0.0.1: two ``torchrun --nnodes 2 --nproc_per_node 1``
launches meeting at a c10d rendezvous (their service list led by a replica that is down) make the
same video as one ``--nproc_per_node 2`` launch (Ulysses 2, CFG 2); the rule that keeps Ulysses groups inside a node; service replicas with one
down and one answering 503; a prompt suite run as two shards (one killed and rerun) into one save
path, merged by benchmark/report.py."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from stepvideo.parallel import LaunchEnv, ParallelConfig
from stepvideo.service import replicas
from stepvideo.service.client import RemoteTextEncoder, RemoteVAE, RetryPolicy, ServiceError
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


def launch(torchrun_args: list[str], args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def one_node(args: list[str]) -> subprocess.Popen:
    return launch(["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                   str(free_port())], args)


def two_nodes(args: list[str]) -> list[subprocess.Popen]:
    """Both "nodes" started at once, as a cluster would: a c10d rendezvous on 127.0.0.1."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    return [launch(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", run_id,
                    "--local_addr", "127.0.0.1"], args) for node_rank in (0, 1)]


def finish(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return out


@pytest.mark.parametrize("degrees", [["--ulysses_degree", "2"], ["--cfg_parallel"]],
                         ids=["ulysses2", "cfg2"])
def test_two_nodes_make_the_same_video(degrees, tiny_model_dir, service, tmp_path):
    # the reference launch and the two "nodes" run side by side; the nodes' service list starts
    # with a replica that is down, so rank 0's calls fail over to the live one
    replicas_url = f"127.0.0.1:{free_port()},{service}"
    ref, *runs = finish([one_node(cli_args(tiny_model_dir, service, tmp_path / "one", degrees)),
                         *two_nodes(cli_args(tiny_model_dir, replicas_url, tmp_path / "two",
                                             degrees))])
    for r in (ref, *runs):
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


# --------------------------------------------------------------------------------------------
# Service replicas
# --------------------------------------------------------------------------------------------

class Busy(BaseHTTPRequestHandler):
    """A replica that is up but answers 503 (still loading) to everything."""

    hits = 0

    def _busy(self):
        type(self).hits += 1
        body = json.dumps({"error": "models are loading", "retryable": True}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _busy

    def log_message(self, *args):
        pass


@pytest.fixture
def busy_replica():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Busy.hits = 0
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_replicas_one_down_one_busy_every_answer_right(service, busy_replica):
    down = f"127.0.0.1:{free_port()}"
    urls = f"{down}, {service},{busy_replica}"
    fast = RetryPolicy(max_wait=1.0, initial_backoff=0.1)
    enc, dec = replicas.text_encoder(urls, retry=fast), replicas.vae(urls, retry=fast)
    assert isinstance(enc, replicas.ReplicatedTextEncoder) and len(enc.clients) == 3
    direct_enc, direct_dec = RemoteTextEncoder(service), RemoteVAE(service)
    g = torch.Generator().manual_seed(0)
    for i in range(4):  # the round-robin start visits every replica
        prompts = [f"a red fox, take {i}", "a quiet harbour at dawn"]
        got, want = enc.encode(prompts), direct_enc.encode(prompts)
        for f in ("y", "mask", "clip"):
            assert torch.equal(getattr(got, f), getattr(want, f))
        z = torch.randn(1, 3, 16, 4, 4, generator=g)
        assert torch.equal(dec.decode_uint8(z), direct_dec.decode_uint8(z))
    assert Busy.hits >= 1, "the 503 replica was never asked"
    health = enc.health()
    assert health["status"] == "ready"
    assert [h["status"] for h in health["replicas"].values()] == ["unreachable", "ready",
                                                                  "unavailable"]
    # a 4xx is the request's fault: raised at once by the replica that answered, no failover
    with pytest.raises(ServiceError, match="HTTP 422") as e:
        enc.encode(["x" * 20_001])
    assert e.value.url.startswith("http://" + service)


def test_replicas_all_down_names_every_replica(busy_replica):
    down = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    enc = replicas.text_encoder(",".join([*down, busy_replica]),
                                retry=RetryPolicy(max_wait=0.3, initial_backoff=0.1))
    with pytest.raises(ServiceError, match="all 3 replicas failed") as e:
        enc.encode(["a fox"])
    for url in [*down, busy_replica]:
        assert f"http://{url}:" in str(e.value) or f"http://{url}" in str(e.value)
    assert "HTTP 503: models are loading" in str(e.value) and "unreachable" in str(e.value)
    with pytest.raises(ServiceError, match="no replica answers") as e:  # the runner's check
        replicas.vae(",".join(down)).health()
    assert all(f"http://{url}" in str(e.value) for url in down)
    assert isinstance(replicas.vae(down[0]), RemoteVAE)  # one address: the plain client
    with pytest.raises(ValueError, match="no empty entry"):
        replicas.vae(f"{down[0]},,")


def test_replica_order_round_robin_and_cooldown():
    clients = [RemoteVAE(f"127.0.0.1:{p}") for p in (1001, 1002, 1003)]
    r = replicas.ReplicatedVAE(clients, cooldown=60)
    assert [r.order()[0] for _ in range(4)] == [0, 1, 2, 0]
    r._failed_at[1] = __import__("time").monotonic()  # replica 1 just failed: it goes last
    assert [r.order() for _ in range(3)] == [[2, 0, 1], [2, 0, 1], [0, 2, 1]]


# --------------------------------------------------------------------------------------------
# Sharded prompt suites
# --------------------------------------------------------------------------------------------

SHARDS = {1: [1, 3, 5], 2: [2, 4, 6]}        # every 2nd prompt of lines 1-6 of stepvideo-mini


def shard_cmd(model_dir: str, url: str, save: Path, k: int) -> list[str]:
    return [sys.executable, str(ROOT / "benchmark" / "run_benchmark.py"), "--model_dir", model_dir,
            "--vae_url", url, "--caption_url", url, "--suite", "stepvideo-mini", "--lines", "1-6",
            "--shard", f"{k}/2", "--save_path", str(save), "--device", "cpu", *SIZE]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**ENV, "PYTHONUNBUFFERED": "1"})


def ok_records(save: Path, part: str) -> list:
    from stepvideo.suite import ManifestRecord

    path = save / part
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(ManifestRecord.from_json(json.loads(line)))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if r.status == "ok"]


def test_shards_split_a_suite_one_killed_and_rerun(tiny_model_dir, service, tmp_path, capsys):
    import time

    from stepvideo.shards import Shard
    from stepvideo.suite import latest_by_index, read_manifest
    from tests.test_benchmark import check_gallery, finished_videos

    save = tmp_path / "results"
    logs = {k: tmp_path / f"shard{k}.log" for k in (1, 2)}
    procs = {k: start(shard_cmd(tiny_model_dir, service, save, k), logs[k]) for k in (1, 2)}
    part2 = Shard(2, 2).manifest
    try:
        deadline = time.monotonic() + 180
        while not ok_records(save, part2):  # kill shard 2 once its first prompt is recorded
            assert procs[2].poll() is None, logs[2].read_text(errors="replace")
            assert time.monotonic() < deadline, logs[2].read_text(errors="replace")
            time.sleep(0.02)
        assert procs[2].poll() is None, "shard 2 finished before the kill"
        procs[2].kill()
        procs[2].wait(timeout=30)
        assert procs[1].wait(timeout=180) == 0, logs[1].read_text(errors="replace")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    done2 = [r.index for r in ok_records(save, part2)]
    assert 1 <= len(done2) < 3 and set(done2) <= set(SHARDS[2])
    partial = json.loads((save / "summary.json").read_text(encoding="utf-8"))
    assert partial["run"]["missing"] == ["shard-2-of-2"] and partial["prompts"] == 6
    assert partial["ok"] == 3 + len(done2) and partial["pending"] == 3 - len(done2)

    rerun = start(shard_cmd(tiny_model_dir, service, save, 2), tmp_path / "rerun.log")
    assert rerun.wait(timeout=180) == 0, (tmp_path / "rerun.log").read_text(errors="replace")
    text = (tmp_path / "rerun.log").read_text(errors="replace")
    assert f"{len(done2)} already done, {3 - len(done2)} to run" in text, text

    # each prompt exactly once: one ok record in its own shard's part, one video in its folder
    for k, lines in SHARDS.items():
        assert sorted(r.index for r in ok_records(save, Shard(k, 2).manifest)) == lines
    assert not (save / "manifest.jsonl").exists()
    latest = latest_by_index(read_manifest(save))
    assert sorted(latest) == list(range(1, 7)) and all(r.status == "ok" for r in latest.values())
    assert len(finished_videos(save)) == 6
    for r in latest.values():
        assert len(finished_videos(save / Path(r.outputs["video"]).parent, "*.mp4")) == 1

    report = subprocess.run([sys.executable, str(ROOT / "benchmark" / "report.py"), str(save)],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "merged from the shards" in report.stdout
    summary = json.loads((save / "summary.json").read_text(encoding="utf-8"))
    assert (summary["prompts"], summary["ok"], summary["pending"]) == (6, 6, 0)
    assert summary["run"]["missing"] == [] and summary["per_category"]["Food"]["ok"] == 2
    check_gallery(save, tmp_path, capsys, expected_cards=6)


def test_shard_selection_is_a_partition():
    from stepvideo.shards import Shard
    from stepvideo.suite import SuiteError

    items = list(range(1, 11))
    parts = [Shard(k, 3).select(items) for k in (1, 2, 3)]
    assert parts == [[1, 4, 7, 10], [2, 5, 8], [3, 6, 9]]
    assert sorted(sum(parts, [])) == items
    assert Shard.parse(" 2 / 4 ") == Shard(2, 4) and Shard(2, 4).manifest == \
        "manifest.shard-2-of-4.jsonl"
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(SuiteError, match="--shard"):
            Shard.parse(bad)


# --------------------------------------------------------------------------------------------
# xfuser: checked before anything starts (the GPU comparison is benchmark/gpu_check.py)
# --------------------------------------------------------------------------------------------

def test_xfuser_requirements_are_one_line_each():
    from stepvideo.parallel.xfuser_backend import check_xfuser, version_problem

    assert version_problem({"xfuser": "0.4.5", "yunchang": "0.6.4"}) is None
    assert "xfuser not installed; pip install 'stepvideo[xfuser]'" in \
        version_problem({"xfuser": None, "yunchang": "0.6.4"})
    wrong = version_problem({"xfuser": "0.7.0", "yunchang": "0.6.4"})
    assert "found xfuser 0.7.0, yunchang 0.6.4" in wrong and "update_npu_out" in wrong
    with pytest.raises(RuntimeError, match="does not combine with --tensor_parallel_degree 2"):
        check_xfuser(ParallelConfig(ulysses_degree=2, tensor_parallel_degree=2), "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="runs on CUDA GPUs only .* device is cpu"):
            check_xfuser(ParallelConfig(ulysses_degree=2), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_xfuser_backend_on_cpu_is_one_clear_line(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_parallel.py"), "--model_dir",
                           tiny_model_dir, "--prompt", "a fox", "--parallel_backend", "xfuser",
                           "--save_path", str(tmp_path), *SIZE],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --parallel_backend xfuser runs on CUDA GPUs only"), \
        proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_sbatch_script_launches_torchrun_per_node(tmp_path):
    """scripts/two_nodes.sbatch with stand-ins for scontrol and srun: the torchrun line it runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "77", "SERVICE": "svc1:8080,svc2:8080",
           "STEPVIDEO_ROOT": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "two_nodes.sbatch"), "--prompt", "a fox"],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split("\n")
    line = " ".join(args)
    assert "--nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint gpu-a:29500" in line
    assert "--rdzv_id 77 run_parallel.py" in line
    assert "--vae_url svc1:8080,svc2:8080 --caption_url svc1:8080,svc2:8080" in line
    assert line.rstrip().endswith("--ulysses_degree 8 --cfg_parallel --prompt a fox")
    assert ParallelConfig(ulysses_degree=8, cfg_degree=2).node_layout_note(8, 16) is None
