"""Issue 13 on the CPU: the attention backend registry and ``auto``, the quantized linears and the
``--quantize`` flag. The GPU half is ``benchmark/gpu_speed.py`` (its logic is smoke-tested here)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from stepvideo import quant
from stepvideo.modules import attention as A
from stepvideo.modules.model import DiTConfig
from stepvideo.synthetic import model_inputs, random_model
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def _fresh_attention_state():
    A.set_backend("auto")
    A.clear_auto_cache()
    yield
    A.set_backend("auto")
    A.clear_auto_cache()


def _qkv(sq=96, sk=80, b=2, h=2, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, sq, h, d, generator=g), torch.randn(b, sk, h, d, generator=g),
            torch.randn(b, sk, h, d, generator=g))


# --- the registry ---------------------------------------------------------------------------------

def test_every_backend_is_accepted_or_refused_with_one_line_saying_what_to_install():
    for name in A.NAMES:
        try:
            A.set_backend(name)
        except RuntimeError as e:
            msg = str(e)
            assert "\n" not in msg and f"'{name}'" in msg
            assert ("pip install" in msg or "CUDA" in msg), msg
            assert "or choose one of ['sdpa'" in msg  # and what can be used instead
            continue
        assert A.get_backend() == name
    with pytest.raises(ValueError, match=r"unknown attention backend 'xformers'; choose one of "
                                         r"\['auto', 'sdpa', 'cudnn', 'flash', 'fa4', 'flex', 'sage'\]"):
        A.set_backend("xformers")


def test_on_this_cpu_machine_the_cuda_backends_are_refused_and_sdpa_flex_remain():
    assert torch.cuda.is_available() is False
    assert A.available_backends() == ["sdpa", "flex"]
    for name in ("cudnn", "fa4", "sage"):
        with pytest.raises(RuntimeError, match=f"backend '{name}' needs"):
            A.set_backend(name)
    # a CUDA-only backend given CPU tensors is an error, never a quiet switch to sdpa

def test_a_cuda_backend_given_cpu_tensors_is_an_error_not_a_quiet_switch(monkeypatch):
    monkeypatch.setattr(A, "_selected", "cudnn")  # as if chosen on a machine with a GPU
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"backend 'cudnn' needs CUDA inputs, got cpu; use 'sdpa'"):
        A.attention(q, k, v)


CASES = {
    "no mask": lambda k, v: (k, v, None),
    "text mask": lambda k, v: (k, v, torch.tensor([80, 23])),
    "uneven Ulysses keys": lambda k, v: (k[:, :71], v[:, :71], None),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["sdpa", "flex"])
def test_cpu_backends_match_sdpa_with_masks(name, case):
    q, k, v = _qkv()
    k, v, lens = CASES[case](k, v)
    ref = A.BACKENDS["sdpa"].fn(q, k, v, lens)
    A.set_backend(name)
    out = A.attention(q, k, v, lens)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    if lens is not None:  # the mask matters: keys past kv_lens change the unmasked answer
        assert (A.BACKENDS["sdpa"].fn(q, k, v, None) - ref).abs().max() > 1e-2


def test_per_sample_slicing_is_the_mask():
    """cudnn and sage have no key mask of their own: they run each sample on its first kv_lens[b]
    keys. With sdpa as the kernel that must equal sdpa's masked answer."""
    q, k, v = _qkv()
    lens = torch.tensor([80, 5])
    ref = A.BACKENDS["sdpa"].fn(q, k, v, lens)
    dense_calls = []

    def dense(q_, k_, v_, kv):
        assert kv is None
        dense_calls.append(k_.shape[1])
        return A._sdpa(q_, k_, v_, None)

    torch.testing.assert_close(A._per_sample(dense, q, k, v, lens), ref, atol=2e-6, rtol=1e-5)
    assert dense_calls == [80, 5]
    dense_calls.clear()
    A._per_sample(dense, q, k, v, torch.tensor([80, 80]))  # all keys valid: one batched call
    assert dense_calls == [80]


# --- auto ---------------------------------------------------------------------------------------

def test_choose_fastest_from_a_fake_timing_table():
    assert A.choose_fastest({"sdpa": 0.62, "cudnn": 0.41, "flex": 0.55}) == "cudnn"
    # a backend that failed or changed the numbers never wins, however "fast"
    assert A.choose_fastest({"sdpa": 0.62, "fa4": "ImportError: no cutlass", "flex": 0.70}) == "sdpa"
    assert A.choose_fastest({"flex": 0.5, "sdpa": 0.5}) == "sdpa"  # ties keep registry order
    with pytest.raises(RuntimeError, match="no attention backend ran"):
        A.choose_fastest({"sdpa": "OOM", "cudnn": "OOM"})


def test_auto_times_once_per_signature_caches_and_prints(monkeypatch, capsys):
    fake = {"sdpa": 0.9, "flex": 0.3}
    calls = []

    def timer(name, q, k, v, kv_lens, ref):
        calls.append((name, tuple(q.shape), kv_lens is not None))
        assert ref.shape == q.shape  # candidates are checked against sdpa's output
        return fake[name]

    monkeypatch.setattr(A, "auto_candidates", lambda q: ["sdpa", "flex"])
    q, k, v = _qkv()
    assert A.auto_choice(q, k, v, None, timer=timer) == "flex"
    assert A.auto_choice(q, k, v, None, timer=timer) == "flex"  # cached: no new timing
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert "attention auto: flex for q(2, 96, 2, 128) k(2, 80, 2, 128)" in err
    assert "sdpa 900.00 ms, flex 300.00 ms" in err
    fake.update(sdpa=0.1)  # another signature (masked) is timed on its own
    assert A.auto_choice(q, k, v, torch.tensor([80, 3]), timer=timer) == "sdpa"
    assert len(calls) == 4
    assert sorted(A.auto_choices().values()) == ["flex", "sdpa"]
    # and attention() with 'auto' dispatches to the cached choice
    monkeypatch.setitem(A.BACKENDS, "flex", dataclasses.replace(A.BACKENDS["flex"],
                                                                   fn=lambda *a: torch.zeros(1)))
    assert A.attention(q, k, v).shape == (1,)


def test_auto_is_sdpa_on_the_cpu_without_timing():
    q, k, v = _qkv()
    assert A.auto_candidates(q) == ["sdpa"]
    assert A.auto_choice(q, k, v, None, timer=lambda *a: pytest.fail("timed on the CPU")) == "sdpa"
    assert A.probe_kernel("cpu", torch.float32).startswith("sdpa:")


def test_time_backend_refuses_a_backend_that_changes_the_numbers(monkeypatch):
    q, k, v = _qkv()
    ref = A._sdpa(q, k, v, None)
    monkeypatch.setitem(A.BACKENDS, "flex", dataclasses.replace(
        A.BACKENDS["flex"], fn=lambda q_, k_, v_, kv: A._sdpa(q_, k_, v_, kv) + 0.1))
    verdict = A.time_backend("flex", q, k, v, None, ref, repeats=1)
    assert isinstance(verdict, str) and "exceeds" in verdict
    assert isinstance(A.time_backend("sdpa", q, k, v, None, ref, repeats=1), float)


# --- quantized linears ----------------------------------------------------------------------------

def test_e4m3_rowwise_round_trip_within_the_bound():
    g = torch.Generator().manual_seed(0)
    # rows of very different scale, and tiny entries that land on e4m3 subnormals
    w = torch.randn(64, 256, generator=g) * torch.logspace(-4, 1, 64)[:, None]
    w[:, :8] *= 1e-4
    w8, scale = quant.quantize_rowwise(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = quant.dequantize_rowwise(w8, scale, torch.float32)
    err = (back - w).abs()
    bound = quant.rowwise_error_bound(w, scale)
    assert bool((err <= bound).all()), (err - bound).max()
    assert err.max() > 0  # it is a real rounding, not a copy
    # each row's largest entry is exactly representable (it maps to +-448)
    assert torch.allclose(back.abs().amax(1), w.abs().amax(1), rtol=1e-6)
    # and the bound is not loose: relative error reaches a sizeable part of 2^-4 somewhere
    normal = w.abs() > scale[:, None] * 2 ** -6
    assert (err[normal] / w.abs()[normal]).max() > 0.02


def _tiny_dit(layers=2):
    cfg = DiTConfig(num_attention_heads=2, num_layers=layers, caption_channels=(64, 32))
    return cfg, random_model(cfg, torch.device("cpu"), torch.float32, seed=0)


def test_fp8_weight_mode_stores_e4m3_and_stays_close():
    cfg, ref = _tiny_dit()
    _, model = _tiny_dit()
    inputs = model_inputs(cfg, 2, (2, 4, 4), 90, 77, torch.device("cpu"), torch.float32, seed=1)
    with torch.no_grad():
        want = ref(**inputs, return_dict=False)
    n = quant.quantize_dit(model, "fp8_weight")
    assert n == 7 * cfg.num_layers  # wqkv, wo | wq, wkv, wo | ff in, ff out
    state = model.state_dict()
    assert state["transformer_blocks.0.attn1.wqkv.weight"].dtype == torch.float8_e4m3fn
    assert state["transformer_blocks.0.attn1.wqkv.weight_scale"].shape == (3 * cfg.inner_dim,)
    assert state["proj_out.weight"].dtype == torch.float32  # only the blocks' linears
    with torch.no_grad():
        got = model(**inputs, return_dict=False)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert 0.999 < cos < 1.0, cos
    lin = model.transformer_blocks[0].ff.net[2]
    x = torch.randn(3, lin.in_features)
    torch.testing.assert_close(lin(x), x @ lin.dequantized_weight().T)


def test_fp8_refuses_on_the_cpu_with_one_line():
    with pytest.raises(RuntimeError) as e:
        quant.check_mode("fp8", "cpu")
    assert "\n" not in str(e.value) and "--quantize fp8 needs a CUDA GPU" in str(e.value)
    assert "fp8_weight" in str(e.value)
    _, model = _tiny_dit(1)
    with pytest.raises(RuntimeError, match="--quantize fp8 needs a CUDA GPU"):
        quant.quantize_dit(model, "fp8")
    with pytest.raises(ValueError, match=r"unknown --quantize mode 'int4'; choose one of"):
        quant.check_mode("int4", "cpu")
    with pytest.raises(ValueError, match="not combined with tensor parallelism"):
        quant.check_mode("fp8_weight", "cpu", tensor_parallel=2)
    quant.check_mode("fp8_weight", "cpu")
    quant.check_mode("none", "cpu", tensor_parallel=2)


def test_runner_flag_refuses_fp8_on_cpu_before_loading(tiny_model_dir, tmp_path):
    from stepvideo.runner import request_from_args

    base = ["--model_dir", tiny_model_dir, "--prompt", "x", "--save_path", str(tmp_path)]
    assert request_from_args(base).memory.quantize == "none"
    assert request_from_args([*base, "--quantize", "fp8_weight", "--attn_backend", "flex"]) \
        .memory.quantize == "fp8_weight"
    proc = subprocess.run([sys.executable, str(ROOT / "run_parallel.py"), *base, "--quantize", "fp8",
                           "--vae_url", "127.0.0.1:9", "--caption_url", "127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "--quantize fp8 needs a CUDA GPU" in lines[0]


# --- the prepared GPU script, at toy size on the CPU ---------------------------------------------

def _gpu_speed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "benchmark" / "gpu_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_speed_script_runs_every_stage_at_toy_size(tmp_path, capsys):
    gs = _gpu_speed()
    out = tmp_path / "speed.json"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{gs.README_BEGIN}\nold\n{gs.README_END}\ntail\n")
    assert gs.main(["--tiny", "--repeats", "1", "--err-steps", "2", "--json", str(out),
                    "--readme", str(readme)]) == 0
    report = json.loads(out.read_text())
    assert list(report["stages"]) == ["attention", "block", "error", "profile", "step"]
    attn_rows = {r["backend"]: r for r in report["stages"]["attention"]["rows"]}
    assert set(attn_rows) == set(A.BACKENDS)
    assert attn_rows["flex"]["status"] == "ok" and attn_rows["flex"]["max_abs_err_vs_sdpa"] < 1e-5
    assert [p["case"] for p in attn_rows["flex"]["parity"]] == ["no mask", "text mask", "fewer keys"]
    assert attn_rows["sage"]["status"].startswith("not run: attention backend 'sage' needs")
    block = {r["mode"]: r for r in report["stages"]["block"]["rows"]}
    assert block["exact eager"]["cosine_vs_exact"] == pytest.approx(1.0)
    assert block["fp8 linears"]["status"].startswith("not run: --quantize fp8 needs a CUDA GPU")
    assert 0.999 < block["fp8_weight storage"]["cosine_vs_exact"] < 1.0
    step = {r["mode"]: r for r in report["stages"]["step"]["rows"]}
    assert step["exact compiled"]["status"] == "ok" and step["exact compiled"]["s"] > 0
    err = {r["mode"]: r for r in report["stages"]["error"]["rows"]}
    assert len(err["fp8_weight storage"]["per_layer_cosine"]) == 2
    prof = report["stages"]["profile"]["block, exact eager"]
    assert abs(sum(prof["by_category"].values()) - 1) < 1e-6 and prof["top"]
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{gs.README_END}\ntail\n")
    assert "| flex | yes |" in text and "| fp8_weight storage |" in text
    # a saved report with a missed target renders and exits 1
    report["checks"].append({"check": "exact whole step >= 70% of bf16 peak", "ok": False})
    out.write_text(json.dumps(report))
    assert gs.main(["--render", str(out)]) == 1
    assert "exact whole step >= 70% of bf16 peak: NOT met" in capsys.readouterr().out


def test_profile_categories():
    gs = _gpu_speed()
    assert gs.categorize("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert gs.categorize("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert gs.categorize("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT") == "gemm"
    assert gs.categorize("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert gs.categorize("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>") \
        == "copy / cast / layout"
    assert gs.categorize("void at::native::CatArrayBatchedCopy<...>") == "copy / cast / layout"
    # a compiled RMSNorm is a fusion, not a copy, though its name says _to_copy
    assert gs.categorize("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0").startswith("compiled")
    assert gs.categorize("cudnn::engine_runtime_conv_fprop") == \
        "norm / rope / modulate / other elementwise"  # cuDNN convolution is not attention
    assert gs.categorize("void at::native::vectorized_layer_norm_kernel<>") == \
        "norm / rope / modulate / other elementwise"


def test_gpu_session_runs_topics_in_budget(tmp_path):
    """benchmark/gpu_session.py: the one device call that runs the prepared scripts in order; a
    topic runs its script (JSON and log written, checks passed) and one that the budget cannot
    hold is skipped and fails the session."""
    script = str(ROOT / "benchmark" / "gpu_session.py")
    ok = subprocess.run([sys.executable, script, "--tiny", "--out", str(tmp_path), "one_gpu"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    session = json.loads((tmp_path / "session.json").read_text())
    (row,) = session["topics"]
    assert row["status"] == "passed" and row["wrote_json"]
    report = json.loads((tmp_path / "cpu_one_gpu.json").read_text())
    assert report["checks"] and all(c["ok"] for c in report["checks"])
    assert "checks, 0 failed" in (tmp_path / "one_gpu.log").read_text()

    short = subprocess.run([sys.executable, script, "--tiny", "--out", str(tmp_path / "b"),
                            "speed:60"], capture_output=True, text=True, timeout=120)
    assert short.returncode == 1
    (row,) = json.loads((tmp_path / "b" / "session.json").read_text())["topics"]
    assert row["status"] == "skipped" and "needs 120 s" in row["why"]
    bad = subprocess.run([sys.executable, script, "--tiny", "speeed"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown topic 'speeed'" in bad.stderr
