"""The runner end to end: scripts/demo.sh (tiny model, real service, torchrun, H.264), seeds, and
one-line errors for bad flags."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

from stepvideo.runner import request_from_args
from stepvideo.video_io import read_frames, read_video_info
from tests.helpers import ROOT, free_port, running_service

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("service") / "server.log"
    with running_service(model_dir, log=log) as (_, url):
        yield url.removeprefix("http://")      # the runner's flags take host:port as well


def run_cli(args, nproc=1, timeout=300):
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "run_parallel.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(ROOT / "run_parallel.py")]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=ENV, timeout=timeout)


def test_demo_script_makes_a_real_video(tmp_path):
    env = {**ENV, "DEMO_DIR": str(tmp_path), "DEMO_PORT": str(free_port()), "DEMO_STEPS": "3"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("wrote ")][-1]
    mp4, sidecar, sheet = re.match(r"wrote (\S+\.mp4) .* sidecar (\S+\.json), contact sheet (\S+\.png)",
                                   line).groups()
    info = read_video_info(mp4)
    assert (info["frames"], info["width"], info["height"]) == (17, 128, 128)
    assert info["fps"] == 25 and info["codec"].startswith("h264")
    record = json.loads(Path(sidecar).read_text())
    assert record["degrees"]["world_size"] == 2 and record["degrees"]["ulysses_degree"] == 2
    assert record["seed"] == 42 and record["settings"]["infer_steps"] == 3
    assert {"text_encode", "denoise", "vae_decode", "write"} <= set(record["times_s"])
    assert Path(sheet).stat().st_size > 0


def _video(service, model_dir, out, seed, extra=()):
    args = ["--model_dir", model_dir, "--vae_url", service, "--caption_url", service, "--prompt",
            "a lighthouse in a storm", "--num_frames", "17", "--height", "64", "--width", "96",
            "--infer_steps", "2", "--seed", str(seed), "--save_path", str(out), *extra]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_frames(next(Path(out).glob(f"*seed{seed}*.mp4")))


def test_seed_decides_the_video(service, model_dir, tmp_path):
    a = _video(service, model_dir, tmp_path / "a", 1)
    b = _video(service, model_dir, tmp_path / "b", 1)
    c = _video(service, model_dir, tmp_path / "c", 2)
    assert a.shape == (17, 64, 96, 3)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def _one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_flags_give_one_clear_message(service, model_dir, tmp_path):
    base = ["--vae_url", service, "--caption_url", service, "--prompt", "x",
            "--save_path", str(tmp_path / "o")]
    _one_line_error(run_cli(["--model_dir", str(tmp_path / "missing"), *base]),
                    r"--model_dir .*missing does not exist")
    env_rank = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "run_parallel.py"), "--model_dir", model_dir,
                           *base, "--ulysses_degree", "3"], capture_output=True, text=True,
                          env={**ENV, **env_rank}, timeout=120)
    _one_line_error(proc, r"4 heads are not divisible by ulysses degree 3")
    _one_line_error(run_cli(["--model_dir", model_dir, *base, "--ulysses_degree", "2"]),
                    r"world size 1 != ulysses 2")
    dead = f"127.0.0.1:{free_port()}"
    proc = run_cli(["--model_dir", model_dir, "--vae_url", dead, "--caption_url", dead,
                    "--prompt", "x", "--save_path", str(tmp_path / "o")])
    _one_line_error(proc, r"caption service at .* unreachable")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _one_line_error(run_cli(["--model_dir", model_dir, *base[:-1], str(blocker / "sub")]),
                    r"--save_path .* is not writable")


def test_presets_and_help():
    req = request_from_args(["--model_dir", "m", "--prompt", "p", "--preset", "turbo"])
    assert (req.infer_steps, req.cfg_scale, req.time_shift) == (15, 5.0, 17.0)
    req = request_from_args(["--model_dir", "m", "--prompt", "p", "--cfg_scale", "7", "--cfg_parallel"])
    assert (req.infer_steps, req.cfg_scale, req.time_shift) == (50, 7.0, 13.0)
    assert req.parallel.cfg_degree == 2 and (req.height, req.width, req.num_frames) == (544, 992, 204)
    out = subprocess.run([sys.executable, str(ROOT / "run_parallel.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--ulysses_degree" in out.stdout and "--cfg_parallel" in out.stdout


def test_vae_failure_keeps_the_latents(model_dir, tmp_path):
    """A VAE service that refuses the decode (here: a latent cap below the video's size) fails the
    run with one line after denoising, and the denoised latents are on disk to decode later."""
    from safetensors.torch import load_file

    with running_service(model_dir, "--max_latent_elements", "64") as (_, url):
        proc = run_cli(["--model_dir", model_dir, "--vae_url", url, "--caption_url", url,
                        "--prompt", "a kite", "--num_frames", "17", "--height", "64", "--width", "64",
                        "--infer_steps", "2", "--seed", "5", "--save_path", str(tmp_path)])
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    saved = re.search(r"latents are saved in (\S+\.latents\.safetensors)", lines[0]).group(1)
    latents = load_file(saved)["latents"]
    assert latents.shape[:2] == (1, 3) and torch.isfinite(latents).all()
    assert not list(tmp_path.glob("*.mp4"))


def test_sampling_values_checked_before_loading(model_dir, tmp_path):
    """Values the release would quietly change or only fail on after denoising: refused up front
    with one line, or run with a note saying what was changed."""
    from stepvideo.runner import check_request

    base = ["--model_dir", model_dir, "--vae_url", "127.0.0.1:9", "--caption_url", "127.0.0.1:9",
            "--prompt", "x", "--save_path", str(tmp_path / "o")]
    _one_line_error(run_cli([*base, "--infer_steps", "0"]), r"--infer_steps must be >= 1, got 0")
    _one_line_error(run_cli([*base, "--num_frames", "0"]), r"--num_frames 0 must be >= 1")
    _one_line_error(run_cli([*base, "--height", "10"]), r"--height 10 is below 16 pixels")
    _, notes = check_request(request_from_args([*base, "--height", "70", "--num_frames", "40",
                                                "--cfg_scale", "-1"]))
    assert "--height 70 rounded down to 64 (a multiple of 16)" in notes
    assert "--num_frames 40 rounded down to 34 (a multiple of 17)" in notes
    assert any(n.startswith("--cfg_scale -1.0 is negative") for n in notes)
    _, notes = check_request(request_from_args([*base, "--height", "64", "--num_frames", "17"]))
    assert not any("--height" in n or "--num_frames" in n for n in notes)


def test_sidecar_records_what_ran(service, model_dir, tmp_path):
    _video(service, model_dir, tmp_path, 3, extra=("--dtype", "fp32"))
    record = json.loads(next(tmp_path.glob("*seed3*.json")).read_text())
    assert record["settings"]["dtype"] == "fp32"
    assert record["resolved"]["device"] == "cpu" and record["resolved"]["dtype"] == "float32"
    assert record["resolved"]["attn_backend"].startswith("sdpa:")
    assert record["created_utc"].endswith("+00:00")


def test_quantize_fp8_weight_end_to_end(service, model_dir, tmp_path):
    """--quantize fp8_weight runs the whole job on the CPU (e4m3 block weights, dequantised at use)
    and the sidecar says so; the rounding reaches the video (its closeness to the unquantized model
    is tested on the DiT in test_speed.py)."""
    quantized = _video(service, model_dir, tmp_path / "q", 6, extra=("--quantize", "fp8_weight"))
    plain = _video(service, model_dir, tmp_path / "p", 6)
    record = json.loads(next((tmp_path / "q").glob("*seed6*.json")).read_text())
    assert record["settings"]["memory"]["quantize"] == "fp8_weight"
    assert record["settings"]["quantize"] == "fp8_weight"   # what a suite rerun compares
    assert quantized.shape == plain.shape and not np.array_equal(quantized, plain)


def test_ctrl_c_prints_one_line(service, model_dir, tmp_path):
    """SIGINT while denoising: exit 130, one line, no traceback, no video."""
    import re
    import signal
    import time

    args = ["--model_dir", model_dir, "--vae_url", service, "--caption_url", service, "--prompt",
            "a slow river", "--num_frames", "17", "--height", "128", "--width", "128",
            "--infer_steps", "2000", "--save_path", str(tmp_path / "out")]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        # A shell without job control starts background commands with SIGINT ignored, and Python
        # keeps an ignored SIGINT: give the child the default disposition, as a terminal would.
        proc = subprocess.Popen([sys.executable, str(ROOT / "run_parallel.py"), *args],
                                stdout=subprocess.DEVNULL, stderr=f, text=True, env=ENV,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # two steps done, then Ctrl-C
            if re.search(r"denoising:\s+\d+%\|[^|]*\| *([2-9]|\d\d+)/2000", log.read_text()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    after_start = err[err.index("denoising"):]  # what libraries print at import is not ours
    lines = [l for l in after_start.replace("\r", "\n").splitlines()
             if l.strip() and "denoising" not in l]
    assert lines == ["interrupted: no video written"], lines
    assert not list((tmp_path / "out").glob("*.mp4"))


def test_local_encoders_match_the_service(model_dir, tmp_path):
    """--caption_url local --vae_url local: Step-1 + CLIP and the VAE in the job's process give
    the same video, frame for frame, as the same classes behind the service (both single-threaded,
    same dtype)."""
    with running_service(model_dir, "--dtype", "bfloat16", env={"OMP_NUM_THREADS": "1"}) as (_, url):
        remote = _video(url, model_dir, tmp_path / "remote", 4)
    args = ["--model_dir", model_dir, "--caption_url", "local", "--vae_url", "local",
            "--encoder_dtype", "bfloat16", "--prompt", "a lighthouse in a storm",
            "--num_frames", "17", "--height", "64", "--width", "96", "--infer_steps", "2",
            "--seed", "4", "--save_path", str(tmp_path / "local")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           str(ROOT / "run_parallel.py"), *args],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = read_frames(next((tmp_path / "local").glob("*seed4*.mp4")))
    assert np.array_equal(local, remote)
    record = json.loads(next((tmp_path / "local").glob("*seed4*.json")).read_text())
    assert record["settings"]["caption_url"] == "local" and "load_local_models" in record["times_s"]


def test_local_parts_are_checked_up_front(model_dir, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    shutil.rmtree(partial / "vae")
    base = ["--model_dir", str(partial), "--caption_url", "local", "--prompt", "x",
            "--save_path", str(tmp_path / "o")]
    proc = run_cli([*base, "--vae_url", "local"])
    _one_line_error(proc, r"incomplete for step_llm, hunyuan_clip, vae: 1 file\(s\) missing")
    assert "vae_v2.safetensors" in proc.stderr
    base[1] = model_dir
    _one_line_error(run_cli([*base, "--encoder_device", "cuda:7"]), r"no CUDA device is visible")


def test_long_prompts_get_a_note(model_dir):
    from stepvideo.diffusion.video_pipeline import POS_MAGIC
    from stepvideo.text_encoder.local import prompt_length_notes

    assert prompt_length_notes(model_dir, "a lighthouse in a storm" + POS_MAGIC) == []
    notes = prompt_length_notes(model_dir, "a lighthouse in a storm, " * 60)
    assert len(notes) == 2
    assert notes[0].startswith("the prompt is ") and "Step-1 tokens" in notes[0]
    assert "CLIP tokens; CLIP reads the first 77" in notes[1]
    assert prompt_length_notes(str(Path(model_dir) / "transformer"), "x " * 500) == []
