"""Step caching and CFG truncation (stepvideo.diffusion.cache): the TeaCache polynomial and
accumulation rule against hand-computed values, exactness when off, skipped steps counted, 2-rank
Ulysses and CFG-parallel runs equal to one rank with the same setting, the runner's flags and
sidecar, and the quality harness on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepvideo.diffusion.cache import (TEACACHE_STEPVIDEO, AccumulatedDistance, CacheConfig,
                                       StepCache, negative_schedule, teacache_rescale)
from stepvideo.diffusion.scheduler import FlowMatchDiscreteScheduler
from stepvideo.diffusion.video_pipeline import denoise, initial_noise
from stepvideo.modules.model import StepVideoModel
from stepvideo.runner import request_from_args
from tests.dist_worker import text_for
from tests.helpers import ROOT, free_port, running_service

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WORKER = str(Path(__file__).with_name("dist_worker.py"))
STEPS = 6
# 45 tokens (odd: the 2-way split pads one), batch 2, 6 steps.
SHAPE = ["--frames", "3", "--h", "3", "--w", "5", "--batch", "2", "--steps", str(STEPS)]


# --- the rules, by hand ---------------------------------------------------------------------------

def test_teacache_rescale_hand_values():
    assert teacache_rescale(2.0, (1.0, 2.0, 3.0)) == 11.0  # x^2 + 2x + 3
    assert teacache_rescale(0.0) == pytest.approx(0.284921593)
    # 6743.52814 * 0.1^4 - 2228.14115 * 0.1^3 + 255.029094 * 0.1^2 - 11.2338285 * 0.1 + 0.284921593
    # = 0.674352814 - 2.22814115 + 2.55029094 - 1.12338285 + 0.284921593
    assert teacache_rescale(0.1) == pytest.approx(0.158041347, abs=1e-9)
    assert TEACACHE_STEPVIDEO[0] == 6.74352814e3 and len(TEACACHE_STEPVIDEO) == 5


def test_accumulated_distance_rule():
    rule = AccumulatedDistance(0.3)
    # totals 0.1, 0.2 (reuse), 0.35 (compute, restart), 0.05 (reuse), 0.4 (compute)
    assert [rule.should_compute(d) for d in (0.1, 0.1, 0.15, 0.05, 0.35)] == [
        False, False, True, False, True]
    assert rule.total == 0.0
    rule.should_compute(0.2)
    rule.reset()
    assert rule.total == 0.0
    never = AccumulatedDistance(0.0)
    assert all(never.should_compute(d) for d in (0.0, -1.0, 1e-9))


def test_negative_schedule():
    assert negative_schedule(10, None, 2) == [True] * 10
    assert negative_schedule(10, 0.5, 2) == [True] * 5 + [True, False, True, False, True]
    assert negative_schedule(6, 0.0, 3) == [True, False, False, True, False, False]
    assert negative_schedule(50, 1.0, 4) == [True] * 50
    assert negative_schedule(5, 0.5, 2) == [True] * 4 + [False]  # 2.5 rounds up to 3


def test_config_validation_names_the_flag():
    assert not CacheConfig().enabled and CacheConfig(cfg_truncate=1.0).enabled
    for kwargs, flag in [({"mode": "magcache"}, "--cache "), ({"threshold": -1}, "--cache_threshold"),
                         ({"warmup": 0}, "--cache_warmup"), ({"cfg_truncate": 1.5}, "--cfg_truncate"),
                         ({"cfg_every": 0}, "--cfg_truncate_every")]:
        with pytest.raises(ValueError, match=flag):
            CacheConfig(**kwargs)


# --- the tiny DiT in process ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = StepVideoModel.from_pretrained(tiny_model_dir)
    latents = initial_noise((2, 3, model.config.in_channels, 3, 5), seed=123)
    return model, latents, text_for(model, 2)


@pytest.fixture(scope="module")
def exact(tiny):
    return _denoise(tiny, None)[0]


def _denoise(tiny, config: CacheConfig | None):
    model, latents, text = tiny
    sched = FlowMatchDiscreteScheduler()
    sched.set_timesteps(STEPS, 13.0)
    cache = StepCache(config, STEPS) if config is not None else None
    with torch.inference_mode():
        return denoise(model, latents, text, sched, 9.0, cache=cache), cache


def test_off_is_bit_identical(tiny, exact):
    for config in (CacheConfig("teacache", 0.0), CacheConfig("first_block", 0.0),
                   CacheConfig("none", cfg_truncate=1.0)):
        got, cache = _denoise(tiny, config)
        assert torch.equal(got, exact), config
        assert cache.report()["dit_evaluations"] == 2 * STEPS and cache.reused == []


@pytest.mark.parametrize("config, reused, evaluations", [
    (CacheConfig("teacache", 1e6), [1, 2, 3, 4], 4),  # warm-up step 0 and the last step run
    (CacheConfig("teacache", 1e6, warmup=3), [3, 4], 8),
    (CacheConfig("first_block", 1e6), [1, 2, 3, 4], 4),
    (CacheConfig("none", cfg_truncate=0.5, cfg_every=2), [], 11),  # negative reused at step 4
], ids=["teacache", "teacache-warmup3", "first_block", "cfg_truncate"])
def test_large_threshold_skips_steps(tiny, exact, config, reused, evaluations):
    got, cache = _denoise(tiny, config)
    report = cache.report()
    assert report["reused_steps"] == reused and report["dit_evaluations"] == evaluations
    assert report["full_steps"] == STEPS - len(reused)
    assert report["negative_reused_steps"] == ([4] if config.cfg_truncate is not None else [])
    assert torch.isfinite(got).all() and not torch.equal(got, exact)


# --- parallel: every rank takes the same decision ---------------------------------------------------

def _run(args, nproc: int, out: Path) -> dict:
    from safetensors.torch import load_file

    cmd = [sys.executable, WORKER] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))


# Thresholds between the tiny model's step distances (teacache: rescaled 5.5, 10, 25, 43 per step;
# first_block: relative 0.36-0.45), so that rounding differences between layouts cannot flip one.
PARALLEL_CASES = {
    "ulysses-teacache": (["--ulysses", "2"], ["--cache", "teacache", "--threshold", "12"]),
    "cfg-first_block-truncate": (["--cfg", "2"], ["--cache", "first_block", "--threshold", "0.4",
                                                  "--cfg-truncate", "0.3", "--cfg-every", "2"]),
}


@pytest.mark.parametrize("case", PARALLEL_CASES)
def test_two_ranks_take_the_same_decisions(case, tiny, tiny_model_dir, tmp_path):
    """dist_worker's inputs are the ``tiny`` fixture's (seed 123 noise, text_for(model, 2))."""
    degrees, setting = PARALLEL_CASES[case]
    a = dict(zip(setting[::2], setting[1::2]))
    config = CacheConfig(a["--cache"], float(a["--threshold"]), cfg_every=int(a.get("--cfg-every", 2)),
                         cfg_truncate=float(a["--cfg-truncate"]) if "--cfg-truncate" in a else None)
    one, cache = _denoise(tiny, config)
    two = _run([str(Path(tiny_model_dir) / "transformer"), str(tmp_path / "2.st"), *SHAPE, *setting,
                *degrees], 2, tmp_path / "2.st")
    report = cache.report()
    assert report["reused_steps"], "the setting must reuse something to test anything"
    assert two["reused"].tolist() == report["reused_steps"]
    assert two["negative_reused"].tolist() == (report["negative_reused_steps"] or [-1])
    assert two["evaluations"].tolist() == [report["dit_evaluations"]]
    torch.testing.assert_close(two["latents"], one, atol=1e-4, rtol=1e-5)


# --- the runner: flags, sidecar, progress bar -----------------------------------------------------

def test_flags_parse_and_refuse(capsys):
    req = request_from_args(["--model_dir", "m", "--prompt", "p", "--cache", "teacache",
                             "--cache_threshold", "0.25", "--cfg_truncate", "0.6"])
    assert req.cache == CacheConfig("teacache", 0.25, 1, 0.6, 4)
    assert request_from_args(["--model_dir", "m", "--prompt", "p"]).cache == CacheConfig()
    with pytest.raises(SystemExit) as exit_info:
        request_from_args(["--model_dir", "m", "--prompt", "p", "--cfg_truncate", "2"])
    assert exit_info.value.code == 2 and "--cfg_truncate is a fraction" in capsys.readouterr().err


def test_runner_sidecar_counts_reused_steps(tiny_model_dir, tmp_path):
    with running_service(tiny_model_dir) as (_, url):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "run_parallel.py"), "--model_dir", tiny_model_dir,
             "--vae_url", url, "--caption_url", url, "--prompt", "a kite", "--num_frames", "17",
             "--height", "32", "--width", "32", "--infer_steps", "4", "--save_path", str(tmp_path),
             "--cache", "teacache", "--cache_threshold", "1e6", "--cfg_truncate", "0.5",
             "--cfg_truncate_every", "2", "--no_denoise_filter"],
            capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    # steps 0 and 3 run (warm-up, last); the negative branch from step 0.5 * 4 = 2 on runs
    # every 2nd step: at 2, not at 3. Evaluations: 2 (step 0) + 1 (step 3, positive only).
    assert record["cache"]["reused_steps"] == [1, 2]
    assert record["cache"]["negative_reused_steps"] == [3]
    assert record["cache"]["dit_evaluations"] == 3 and record["cache"]["dit_evaluations_exact"] == 8
    assert record["settings"]["cache"] == "teacache" and record["settings"]["cfg_truncate"] == 0.5
    assert "DiT evals 3/8, reused 2" in proc.stderr


# --- the quality harness --------------------------------------------------------------------------

def _harness():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cache_quality", ROOT / "benchmark" / "perf" / "cache_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_metrics_by_hand():
    h = _harness()
    a = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    assert h.psnr(a, a) == float("inf") and h.ssim(a, a) == pytest.approx(1.0)
    b = a + 5  # MSE 25: PSNR = 10 log10(255^2 / 25) = 20 log10(51)
    assert h.psnr(a, b) == pytest.approx(34.1514, abs=1e-4)
    # constant images: SSIM = (2 mx my + c1) / (mx^2 + my^2 + c1) = (0 + 6.5025) / (25 + 6.5025)
    assert h.ssim(a, b) == pytest.approx(6.5025 / 31.5025)
    assert h.parse_setting("teacache:0.2+cfg_truncate:0.5/3", 2) == CacheConfig(
        "teacache", 0.2, 2, 0.5, 3)
    with pytest.raises(ValueError, match="expected teacache:T"):
        h.parse_setting("magcache:0.1")


def test_harness_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q.json"
    common = ["--num_frames", "17", "--height", "32", "--width", "32", "--infer_steps", "3",
              "--warmup_runs", "0", "--json", str(out)]
    result = _harness().main(["--model_dir", tiny_model_dir, "--prompt", "a kite", *common,
                              "--setting", "teacache:1e6", "--setting", "cfg_truncate:0.3/2"])
    assert json.loads(out.read_text())["mean"].keys() == {"exact", "teacache:1e6",
                                                          "cfg_truncate:0.3/2"}
    exact, tea, trunc = result["rows"]
    assert exact["identical"] and exact["ssim"] == 1.0 and exact["dit_evaluations"] == 6
    assert tea["reused_steps"] == [1] and tea["dit_evaluations"] == 4 and tea["eval_speedup"] == 1.5
    assert trunc["negative_reused_steps"] == [2] and trunc["dit_evaluations"] == 5
    assert 0 < tea["ssim"] < 1 and tea["psnr_db"] > 0
    assert "mean over prompts" in capsys.readouterr().out
    # the GPU check's random-weights mode, at CPU size: speed and latent error only
    result = _harness().main(["--random_dit", "--layers", "2", "--heads", "1", *common,
                              "--setting", "first_block:1e6"])
    assert [r["dit_evaluations"] for r in result["rows"]] == [6, 4]
    assert "ssim" not in result["rows"][1] and result["rows"][1]["latent_rel_err"] > 0
