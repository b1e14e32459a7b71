"""The caption/VAE service over a real socket: a server subprocess on 127.0.0.1 hosting the tiny
model, checked against the same backends run in this process."""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch
from safetensors.torch import save as st_save

from stepvideo.diffusion.video_pipeline import NEG_MAGIC, StepVideoPipeline
from stepvideo.service.client import (RemoteTextEncoder, RemoteVAE, RetryPolicy, ServiceError,
                                      normalize_url)
from stepvideo.text_encoder.local import LocalTextEncoder
from stepvideo.vae.local import LocalVAE
from stepvideo.service.protocol import (CONTENT_TYPE, MAX_LATENT_ELEMENTS, MAX_VAE_BATCH,
                                        CaptionRequest, VAERequest, VAEResponse,
                                        decode_message, encode_message)
from stepvideo.tiny import TinySizes
from stepvideo.video_io import uint8_per_sample
from tests.helpers import ROOT, SERVER, free_port, running_service, start_service, stop_service

MAX_BODY_MB = 2
MAX_LATENT = 1 << 16        # the test server's --max_latent_elements (its default: 2**23)
# CPU on both sides: the in-process references below run on the CPU too.
SERVER_ARGS = ("--device", "cpu", "--max_body_mb", str(MAX_BODY_MB), "--threads", "8",
               "--max_latent_elements", str(MAX_LATENT))
PROMPTS = ["a cat walks on the moon", "一只猫在月球上行走。", ""]
Z = TinySizes().z_channels


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> str:
    return tiny_model_dir


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_service(tiny_dir, *SERVER_ARGS, log=log) as (_, url):
        yield url


@pytest.fixture(scope="module")
def local_text(tiny_dir) -> LocalTextEncoder:
    return LocalTextEncoder.from_dirs(f"{tiny_dir}/step_llm", f"{tiny_dir}/hunyuan_clip",
                                      torch.bfloat16)


@pytest.fixture(scope="module")
def local_vae(tiny_dir) -> LocalVAE:
    return LocalVAE.from_dir(f"{tiny_dir}/vae", torch.bfloat16)


def latents(seed: int, frames: int = 3, h: int = 2, w: int = 3) -> torch.Tensor:
    return torch.randn(1, frames, Z, h, w, generator=torch.Generator().manual_seed(seed))


def post(url: str, body: bytes, content_type: str = CONTENT_TYPE, **headers) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": content_type, **headers},
                         timeout=60)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------

def test_caption_round_trip_equals_in_process(server, local_text):
    remote = RemoteTextEncoder(server).encode(PROMPTS)
    local = local_text.encode(PROMPTS)
    for name in ("y", "mask", "clip"):
        a, b = getattr(remote, name), getattr(local, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert remote.y.shape == (3, 320, 128) and remote.clip.shape == (3, 77, 64)
    assert remote.y.dtype == torch.bfloat16
    assert remote.mask.shape == (3, 77 + 320) and bool(remote.mask[:, :77].all())
    assert remote.mask[:, 77:].sum(1).tolist() == [len(local_text.llm.tokenizer.encode(p)) + 2
                                                   for p in PROMPTS]


def test_negative_prompt_is_cached(server):
    client = RemoteTextEncoder(server)
    before = client.info()["models"]["caption"]["cache"]["hits"]
    first = client.encode(["a dog", NEG_MAGIC])
    second = client.encode(["a bird", NEG_MAGIC])
    info = client.info()["models"]["caption"]
    assert info["cache"]["hits"] >= before + 1
    assert torch.equal(first.y[1], second.y[1])
    assert info["llm_max_length"] == 320 and info["clip_max_length"] == 77


def test_vae_round_trip_equals_in_process(server, local_vae):
    z = latents(0, frames=6)
    client = RemoteVAE(server)
    video = client.decode(z)
    expected = local_vae.decode(z)
    assert video.shape == (1, 34, 3, 32, 48) and video.dtype == torch.bfloat16
    assert torch.equal(video, expected)
    frames = client.decode_uint8(z)
    assert frames.shape == (1, 34, 32, 48, 3) and frames.dtype == torch.uint8
    assert torch.equal(frames, local_vae.decode_uint8(z))
    assert torch.equal(frames, uint8_per_sample(expected))


def test_pipeline_through_service_equals_in_process(server, tiny_dir, local_text, local_vae):
    kwargs = dict(height=32, width=32, num_frames=17, num_inference_steps=2, output_type="tensor",
                  neg_magic=NEG_MAGIC, seed=3)
    remote = StepVideoPipeline.from_pretrained(tiny_dir).setup_api(server, server)
    local = StepVideoPipeline(remote.transformer, remote.scheduler, local_text, local_vae)
    a, b = remote("a red kite", **kwargs)["video"], local("a red kite", **kwargs)["video"]
    assert a.shape == (1, 17, 3, 32, 32) and torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Hostile and malformed bodies
# --------------------------------------------------------------------------------------------

class _Canary:
    """Unpickling this object would create ``path`` (what issue #76 upstream allows)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("endpoint", ["/caption-api", "/vae-api"])
@pytest.mark.parametrize("content_type", [CONTENT_TYPE, "application/octet-stream",
                                          "application/python-pickle"])
def test_pickle_payload_is_rejected(server, tmp_path, endpoint, content_type):
    canary = tmp_path / f"canary{endpoint.replace('/', '_')}"
    body = pickle.dumps({"prompts": [_Canary(str(canary))], "latents": _Canary(str(canary))})
    r = post(server + endpoint, body, content_type)
    assert r.status_code in (400, 415), r.text
    assert "error" in r.json()
    time.sleep(0.2)
    assert not canary.exists()
    assert requests.get(server + "/health", timeout=5).status_code == 200


def test_oversized_body_gets_413(server):
    r = post(server + "/vae-api", b"\0" * (MAX_BODY_MB * (1 << 20) + 1))
    assert r.status_code == 413
    assert "limit" in r.json()["error"] and r.json()["service"] == "vae"
    # Far over the limit waitress itself refuses the body (plain text) before buffering it.
    huge = post(server + "/caption-api", b"\0" * (3 * MAX_BODY_MB * (1 << 20)))
    assert huge.status_code == 413
    assert requests.get(server + "/health", timeout=5).status_code == 200


def test_truncated_and_malformed_bodies_get_400(server):
    good = VAERequest(latents(1)).to_bytes()
    cases = {
        "truncated": good[:-100],
        "header only": good[:20],
        "empty": b"",
        "garbage": b"hello world, not safetensors",
        "wrong kind": CaptionRequest(("x",)).to_bytes(),
        "no protocol": st_save({"latents": latents(1)}),
        "no latents": encode_message("vae_request", {"output": "float"}),
    }
    for name, body in cases.items():
        r = post(server + "/vae-api", body)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"], name
    assert "truncated" in post(server + "/vae-api", good[:-100]).json()["error"]
    bad_prompts = encode_message("caption_request", {"prompts": [1, 2]})
    assert post(server + "/caption-api", bad_prompts).status_code == 400


def test_wrong_dtype_and_shape_get_422(server):
    cases = {
        "float64": (latents(2).double(), "dtype"),
        "int": (latents(2).long(), "dtype"),
        "channels": (torch.randn(1, 3, Z // 4, 2, 2), f"(B, frames, {Z}, h, w)"),
        "4-dim": (torch.randn(3, Z, 2, 2), f"(B, frames, {Z}, h, w)"),
        "frames": (torch.randn(1, 0, Z, 2, 2), "every size >= 1"),
        "batch": (torch.randn(MAX_VAE_BATCH + 1, 3, Z, 1, 1), f"at most {MAX_VAE_BATCH} videos"),
        "elements": (torch.zeros(1, 3, Z, 1, MAX_LATENT // (3 * Z) + 1, dtype=torch.bfloat16),
                     f"max_latent_elements={MAX_LATENT}"),
    }
    for name, (z, words) in cases.items():
        r = post(server + "/vae-api", VAERequest(z).to_bytes())
        assert r.status_code == 422, (name, r.text)
        assert words in r.json()["error"], (name, r.json())
    r = post(server + "/vae-api", VAERequest(latents(2), output="png").to_bytes())
    assert r.status_code == 422
    for f, frames in ((1, 1), (4, 18)):   # the release's rule for short chunks (8t - 7 frames)
        r = post(server + "/vae-api", VAERequest(torch.randn(1, f, Z, 2, 2), output="uint8").to_bytes())
        assert r.status_code == 200, r.text
        assert VAEResponse.from_bytes(r.content).video.shape == (1, frames, 32, 32, 3)
    r = post(server + "/caption-api", CaptionRequest(()).to_bytes())
    assert r.status_code == 422 and "prompts" in r.json()["error"]
    limits = requests.get(server + "/info", timeout=5).json()["limits"]
    assert limits["max_latent_elements"] == MAX_LATENT and limits["max_vae_batch"] == MAX_VAE_BATCH


def test_default_latent_cap_is_2_pow_23():
    from stepvideo.service.server import ServiceModels, create_app

    assert MAX_LATENT_ELEMENTS == 1 << 23 and 36 * 64 * 34 * 62 < MAX_LATENT_ELEMENTS
    client = create_app(ServiceModels(vae=_FailingVAE())).test_client()   # 422 before decoding
    over = torch.zeros(1, 3, Z, 1, MAX_LATENT_ELEMENTS // (3 * Z) + 1, dtype=torch.bfloat16)
    r = client.post("/vae-api", data=VAERequest(over).to_bytes(), content_type=CONTENT_TYPE)
    assert r.status_code == 422 and f"max_latent_elements={MAX_LATENT_ELEMENTS}" in r.json["error"]
    assert client.get("/info").json["limits"]["max_latent_elements"] == MAX_LATENT_ELEMENTS


def test_client_errors_name_the_service_and_do_not_retry(server):
    client = RemoteVAE(server, retry=RetryPolicy(max_wait=30))
    start = time.monotonic()
    with pytest.raises(ServiceError) as err:
        client.decode(torch.randn(1, 3, 4, 2, 2))
    assert time.monotonic() - start < 5
    assert err.value.status == 422 and err.value.service == "vae"
    assert "vae service at" in str(err.value) and str(Z) in str(err.value)


def test_server_keeps_serving_after_errors(server, local_vae):
    post(server + "/vae-api", b"junk")
    post(server + "/vae-api", VAERequest(torch.randn(1, 3, 4, 2, 2)).to_bytes())
    z = latents(5)
    assert torch.equal(RemoteVAE(server).decode(z), local_vae.decode(z))


# --------------------------------------------------------------------------------------------
# Access control
# --------------------------------------------------------------------------------------------

def test_non_loopback_without_token_refuses_to_start(tiny_dir, tmp_path):
    env = {"STEPVIDEO_API_TOKEN": ""}
    proc = subprocess.run([sys.executable, str(SERVER), "--model_dir", tiny_dir, "--host",
                           "0.0.0.0", "--port", str(free_port())], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, **env})
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in proc.stderr
    assert "--token" in proc.stderr and "STEPVIDEO_API_TOKEN" in proc.stderr


def test_token_is_required_when_configured(tiny_dir, tmp_path, local_text):
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret\n", encoding="utf-8")
    # --token_file wins over the environment variable.
    with running_service(tiny_dir, *SERVER_ARGS, "--host", "0.0.0.0", "--token_file",
                         str(token_file), env={"STEPVIDEO_API_TOKEN": "from-env"},
                         log=tmp_path / "token.log") as (_, url):
        body = CaptionRequest(("a cat",)).to_bytes()
        assert post(url + "/caption-api", body).status_code == 401
        wrong = post(url + "/caption-api", body, Authorization="Bearer nope")
        assert wrong.status_code == 401 and "token" in wrong.json()["error"]
        assert post(url + "/caption-api", body, Authorization="Bearer from-env").status_code == 401
        assert requests.get(url + "/info", timeout=5).status_code == 401
        assert requests.get(url + "/health", timeout=5).status_code == 200
        with pytest.raises(ServiceError) as err:
            RemoteTextEncoder(url, token="nope").encode(["a cat"])
        assert err.value.status == 401
        got = RemoteTextEncoder(url, token="s3cret").encode(["a cat"])
        assert torch.equal(got.y, local_text.encode(["a cat"]).y)
        assert RemoteTextEncoder(url, token="s3cret").info()["auth"] == "bearer token"


def _server_script():
    """The server's command line: api/call_remote_server.py is a shim over stepvideo.service.cli."""
    from stepvideo.service import cli

    return cli


def test_token_flags(tmp_path, capsys, monkeypatch):
    from stepvideo.service.server import ServiceConfigError

    monkeypatch.delenv("STEPVIDEO_API_TOKEN", raising=False)
    script = _server_script()
    opts = script.parse_args(["--model_dir", "m", "--token", "on-the-command-line"])
    assert opts.resolved_token() == "on-the-command-line"
    warning = capsys.readouterr().err
    assert "warning: --token" in warning and "STEPVIDEO_API_TOKEN" in warning
    assert "--token_file" in warning

    (tmp_path / "token").write_text("\tfile-token \n", encoding="utf-8")
    opts = script.parse_args(["--model_dir", "m", "--token_file", str(tmp_path / "token")])
    assert opts.resolved_token() == "file-token" and "warning" not in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    for name, words in (("empty", "is empty"), ("missing", "cannot read")):
        opts = script.parse_args(["--model_dir", "m", "--token_file", str(tmp_path / name)])
        with pytest.raises(ServiceConfigError, match=words):
            opts.resolved_token()
    with pytest.raises(SystemExit):
        script.parse_args(["--model_dir", "m", "--token", "a", "--token_file", "b"])
    assert script.parse_args(["--model_dir", "m"]).max_latent_elements == MAX_LATENT_ELEMENTS


# --------------------------------------------------------------------------------------------
# Concurrency, restarts, health under load
# --------------------------------------------------------------------------------------------

def test_sixteen_concurrent_clients(server, local_text, local_vae):
    jobs = [("caption", f"prompt number {i}") if i % 2 else ("vae", i) for i in range(16)]
    expected = {i: (local_text.encode([arg]).y if kind == "caption" else
                    local_vae.decode_uint8(latents(100 + arg)))
                for i, (kind, arg) in enumerate(jobs)}
    barrier = threading.Barrier(16)
    retry = RetryPolicy(max_wait=60, initial_backoff=0.1, max_backoff=1.0)

    def run(i: int) -> torch.Tensor:
        kind, arg = jobs[i]
        barrier.wait()
        if kind == "caption":
            return RemoteTextEncoder(server, retry=retry).encode([arg]).y
        return RemoteVAE(server, retry=retry).decode_uint8(latents(100 + arg))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    for i, got in enumerate(results):
        assert torch.equal(got, expected[i]), jobs[i]


def test_request_succeeds_across_a_server_restart(tiny_dir, tmp_path, local_text):
    port = free_port()
    log = tmp_path / "restart.log"
    first, url = start_service(tiny_dir, *SERVER_ARGS, port=port, log=log)
    stop_service(first)
    client = RemoteTextEncoder(url, retry=RetryPolicy(max_wait=90, initial_backoff=0.2,
                                                      max_backoff=1.0))
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(emb=client.encode(["restart"])))
    worker.start()
    time.sleep(1.5)
    assert worker.is_alive(), "the client should still be retrying while the server is down"
    second, _ = start_service(tiny_dir, *SERVER_ARGS, port=port, log=log, wait=False)
    try:
        worker.join(timeout=120)
        assert not worker.is_alive()
        assert torch.equal(result["emb"].y, local_text.encode(["restart"]).y)
    finally:
        stop_service(second)


def test_health_answers_during_a_long_decode(server):
    z = latents(7, frames=3, h=16, w=16)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (RemoteVAE(server).decode(z), done.set()))
    worker.start()
    time.sleep(0.3)
    answered_while_busy = 0
    while not done.is_set():
        start = time.monotonic()
        r = requests.get(server + "/health", timeout=10)
        assert r.status_code == 200 and time.monotonic() - start < 1.5
        if not done.is_set():
            answered_while_busy += 1
        time.sleep(0.1)
    worker.join()
    assert answered_while_busy >= 2


# --------------------------------------------------------------------------------------------
# In-process units: app behaviour with fake models, the wire format, URLs
# --------------------------------------------------------------------------------------------

class _FailingVAE:
    z_channels = Z

    def decode(self, latents):
        raise RuntimeError("CUDA out of memory (simulated)")

    decode_uint8 = decode


def test_model_failure_is_a_500_with_message_and_loading_is_503():
    from stepvideo.service.server import ServiceModels, create_app

    models = ServiceModels(vae=_FailingVAE())
    client = create_app(models).test_client()
    body = VAERequest(latents(0)).to_bytes()
    r = client.post("/vae-api", data=body, content_type=CONTENT_TYPE)
    assert r.status_code == 500 and "vae model failed" in r.json["error"]
    assert "out of memory" in r.json["error"]
    assert client.post("/vae-api", data=body, content_type=CONTENT_TYPE).status_code == 500
    r = client.post("/caption-api", data=CaptionRequest(("x",)).to_bytes(),
                    content_type=CONTENT_TYPE)
    assert r.status_code == 503 and "caption" in r.json["error"]
    assert client.get("/nope").status_code == 404 and client.get("/nope").json["error"]

    gate = threading.Event()
    loading = ServiceModels()
    loading.load_in_background(lambda: gate.wait(10), None)
    client = create_app(loading).test_client()
    r = client.get("/health")
    assert r.status_code == 503 and r.json["status"] == "loading" and r.json["retryable"]
    r = client.post("/caption-api", data=CaptionRequest(("x",)).to_bytes(),
                    content_type=CONTENT_TYPE)
    assert r.status_code == 503 and r.json["retryable"] and r.headers["Retry-After"] == "1"
    gate.set()

    def broken():
        raise FileNotFoundError("step_llm/config.json")

    failed = ServiceModels()
    failed.load_in_background(broken, None).join()
    client = create_app(failed, token="t").test_client()
    r = client.get("/health")        # open: states and a hint only, never paths or messages
    assert r.status_code == 503 and r.json["status"] == "failed"
    assert r.json["models"] == {"caption": "failed", "vae": "absent"}
    assert "/info" in r.json["hint"] and "step_llm" not in r.get_data(as_text=True)
    assert client.get("/info").status_code == 401
    info = client.get("/info", headers={"Authorization": "Bearer t"}).json
    assert "step_llm/config.json" in info["models"]["caption"]["detail"]
    r = client.post("/caption-api", data=CaptionRequest(("x",)).to_bytes(),
                    content_type=CONTENT_TYPE, headers={"Authorization": "Bearer t"})
    assert r.status_code == 503 and r.json["retryable"] is False


class _AssertingVAE(_FailingVAE):
    def decode(self, latents):
        raise RuntimeError("CUDA error: device-side assert triggered")

    decode_uint8 = decode


def test_cuda_error_marks_the_model_failed():
    from stepvideo.service.server import ServiceModels, create_app, is_cuda_error

    models = ServiceModels(vae=_AssertingVAE())
    client = create_app(models).test_client()
    assert client.get("/health").json["status"] == "ready"
    body = VAERequest(latents(0)).to_bytes()
    r = client.post("/vae-api", data=body, content_type=CONTENT_TYPE)
    assert r.status_code == 500 and "device-side assert" in r.json["error"]
    health = client.get("/health")
    assert health.status_code == 503 and health.json["status"] == "failed"
    assert health.json["models"] == {"caption": "absent", "vae": "failed"}
    assert "device-side assert" in client.get("/info").json["models"]["vae"]["detail"]
    r = client.post("/vae-api", data=body, content_type=CONTENT_TYPE)
    assert r.status_code == 503 and r.json["retryable"] is False
    # Out of memory leaves the context usable (the first test keeps its model ready).
    assert not is_cuda_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_cuda_error(ValueError("CUDA"))
    assert is_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_message_round_trip_keeps_fields_and_tensors():
    y = torch.randn(2, 5, 3).to(torch.bfloat16)
    msg = decode_message(encode_message("x", {"a": [1, "字"]}, {"y": y}), "x")
    assert msg.fields == {"a": [1, "字"]} and torch.equal(msg.tensors["y"], y)


def test_normalize_url():
    assert normalize_url("10.0.0.5") == "http://10.0.0.5:8080"
    assert normalize_url("10.0.0.5:9000") == "http://10.0.0.5:9000"
    assert normalize_url("http://host:81/caption-api") == "http://host:81"
    assert normalize_url("https://example.com/svc/") == "https://example.com:443/svc"
    assert normalize_url("[::1]:7000") == "http://[::1]:7000"
    with pytest.raises(ValueError):
        normalize_url("ftp://host")
    with pytest.raises(ValueError):
        normalize_url("")


def test_cli_help():
    out = subprocess.run([sys.executable, str(SERVER), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0
    for flag in ("--model_dir", "--clip_dir", "--llm_dir", "--vae_dir", "--port", "--host",
                 "--device", "--dtype", "--token"):
        assert flag in out.stdout


def test_no_pickle_in_service_code():
    for path in [*(ROOT / "stepvideo" / "service").glob("*.py"), SERVER]:
        text = path.read_text(encoding="utf-8")
        assert "import pickle" not in text and "pickle.load" not in text, path


class _ZeroVAE:
    z_channels = Z

    def decode(self, latents):
        b, f, _, h, w = latents.shape
        return torch.zeros(b, f // 3 * 17, 3, 16 * h, 16 * w)

    def decode_uint8(self, latents):
        return uint8_per_sample(self.decode(latents))


class _InProcessVAE(RemoteVAE):
    """RemoteVAE whose POSTs go to ``vae`` in this process; ``reshape`` corrupts the answer."""

    def __init__(self, vae, reshape=None):
        super().__init__("127.0.0.1:1")
        self.vae, self.reshape, self.batches = vae, reshape, []

    def _post(self, body: bytes) -> bytes:
        req = VAERequest.from_bytes(body)
        self.batches.append(req.latents.shape[0])
        video = self.vae.decode_uint8(req.latents) if req.output == "uint8" else \
            self.vae.decode(req.latents)
        return VAEResponse(self.reshape(video) if self.reshape else video, req.output).to_bytes()


def test_remote_vae_checks_the_answer_and_splits_big_batches():
    z = latents(0, h=2, w=3)
    assert _InProcessVAE(_ZeroVAE()).decode(z).shape == (1, 17, 3, 32, 48)
    assert _InProcessVAE(_ZeroVAE()).decode_uint8(z).shape == (1, 17, 32, 48, 3)
    bad = {"frames": lambda v: v[:, :-1], "width": lambda v: v[..., :-1],
           "layout": lambda v: v.transpose(-1, -3), "dtype": lambda v: v.to(torch.int32)}
    for name, reshape in bad.items():
        with pytest.raises(ServiceError, match="bad answer from the server: vae_response") as err:
            _InProcessVAE(_ZeroVAE(), reshape).decode(z)
        assert "instead of" in str(err.value), name
    with pytest.raises(ServiceError, match="uint8"):
        _InProcessVAE(_ZeroVAE(), lambda v: v.float()).decode_uint8(z)

    vae = _InProcessVAE(_ZeroVAE())
    video = vae.decode_uint8(torch.randn(MAX_VAE_BATCH + 2, 3, Z, 1, 1))
    assert video.shape == (MAX_VAE_BATCH + 2, 17, 16, 16, 3) and vae.batches == [MAX_VAE_BATCH, 2]


def test_mutated_bodies_never_cause_a_500():
    from stepvideo.service.server import ServiceModels, create_app

    client = create_app(ServiceModels(vae=_ZeroVAE()), max_body=1 << 16).test_client()
    good = VAERequest(latents(0, h=1, w=1), output="uint8").to_bytes()
    gen = torch.Generator().manual_seed(0)
    statuses = set()
    for i in range(300):
        body = bytearray(good)
        for pos in torch.randint(0, len(body), (3,), generator=gen).tolist():
            body[pos] = int(torch.randint(0, 256, (1,), generator=gen))
        cut = len(body) if i % 2 else int(torch.randint(0, len(body), (1,), generator=gen))
        r = client.post("/vae-api", data=bytes(body[:cut]), content_type=CONTENT_TYPE)
        statuses.add(r.status_code)
        assert r.status_code in (200, 400, 422), r.json
        assert r.status_code == 200 or r.json["error"]
    assert {400, 200} <= statuses
