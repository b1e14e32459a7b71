"""Issue 10: the caption/VAE service stays available under hostile and heavy load.

Each attack runs from a bounded loop against a real server subprocess on 127.0.0.1 (a few seconds,
it stops by itself) while :func:`probe` checks that /health answers within 2 s and that a
legitimate caption and VAE request return the in-process results."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from tests.helpers import ROOT, SERVER, free_port, running_service
from stepvideo.service.client import RemoteTextEncoder, RemoteVAE, RetryPolicy, ServiceError
from stepvideo.text_encoder.local import LocalTextEncoder
from stepvideo.vae.local import LocalVAE
from stepvideo.service.protocol import (CONTENT_TYPE, MAX_ERROR_CHARS, PROTOCOL, CaptionRequest,
                                        MalformedMessage, VAELimits, VAERequest, decode_message)
from stepvideo.tiny import TinySizes

Z = TinySizes().z_channels
HEADER_TIMEOUT, SEND_TIMEOUT, PER_IP = 2, 2, 100
SERVER_ARGS = ("--device", "cpu", "--threads", "6", "--max_body_mb", "32",
               "--header_timeout", str(HEADER_TIMEOUT), "--request_timeout", "4",
               "--send_timeout", str(SEND_TIMEOUT), "--idle_timeout", "5", "--max_unsent_mb", "1",
               "--max_connections", "400", "--max_connections_per_ip", str(PER_IP),
               "--max_wait", "10", "--max_video_frames", "34", "--max_video_side", "256",
               "--max_video_area", "32768")


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening") / "server.log"
    with running_service(tiny_model_dir, *SERVER_ARGS, log=log) as (proc, url):
        yield proc, url


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[1]


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    text = LocalTextEncoder.from_dirs(f"{tiny_model_dir}/step_llm",
                                      f"{tiny_model_dir}/hunyuan_clip", torch.bfloat16)
    vae = LocalVAE.from_dir(f"{tiny_model_dir}/vae", torch.bfloat16)
    z = torch.randn(1, 3, Z, 1, 2, generator=torch.Generator().manual_seed(0))
    return {"prompt": "a probe", "y": text.encode(["a probe"]).y, "z": z,
            "video": vae.decode_uint8(z)}


def probe(url: str, expected: dict) -> None:
    """/health within 2 s; a caption and a VAE request that give the in-process answers."""
    start = time.monotonic()
    r = requests.get(url + "/health", timeout=2)
    assert r.status_code == 200 and time.monotonic() - start < 2
    retry = RetryPolicy(max_wait=15, initial_backoff=0.1, max_backoff=1.0)
    y = RemoteTextEncoder(url, retry=retry, timeout=30).encode([expected["prompt"]]).y
    assert torch.equal(y, expected["y"])
    video = RemoteVAE(url, retry=retry, timeout=30).decode_uint8(expected["z"])
    assert torch.equal(video, expected["video"])


def under_attack(url: str, expected: dict, attack, seconds: float) -> int:
    """Run ``attack(stop)`` in a thread for ``seconds`` while probing; returns the probe count."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run():
        try:
            attack(stop)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline, probes = time.monotonic() + seconds, 0
    try:
        time.sleep(0.5)
        while time.monotonic() < deadline:
            probe(url, expected)
            probes += 1
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not errors, errors
    assert probes >= 1, "no probe ran during the attack"
    return probes


def message(kind: str, fields="{}", tensors: dict | None = None, data: bytes = b"",
            meta: dict | None = None) -> bytes:
    """A safetensors body built by hand, so that it can be as wrong as an attacker likes."""
    header = {"__metadata__": meta if meta is not None else
              {"protocol": PROTOCOL, "kind": kind, "fields": fields}, **(tensors or {})}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def raw_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def post(url: str, body: bytes) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": CONTENT_TYPE}, timeout=30)


def http_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Read (and drop) whatever the server sent until it closes, for at most ``within`` s."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------------------------
# 1. Answers nobody reads
# --------------------------------------------------------------------------------------------

def test_error_bodies_are_small_and_never_echo_bulk_input(url):
    kind = "k" * (12 << 20)
    r = post(url + "/caption-api", message(kind))
    assert r.status_code == 400 and len(r.content) < 2 * MAX_ERROR_CHARS
    assert "kkkk" in r.json()["error"] and "cut of 12582912 chars" in r.json()["error"]


def test_pipelined_unread_error_answers_do_not_freeze_the_server(url, expected):
    body = http_request("/caption-api", message("k" * (4 << 20)))

    def attack(stop):
        socks = []
        try:
            for _ in range(16):
                s = socket.create_connection(("127.0.0.1", port_of(url)))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                socks.append(s)
            for _ in range(4):                   # 4 pipelined requests each, never read
                for s in socks:
                    if stop.is_set():
                        return
                    s.sendall(body)
            stop.wait(5)
        finally:
            for s in socks:
                s.close()

    under_attack(url, expected, attack, seconds=5)


def test_client_that_never_reads_its_answer_does_not_hold_a_worker(served, expected):
    proc, url = served
    # 64 copies of one prompt: cheap (the cache answers 63) and a ~6 MB answer, over
    # --max_unsent_mb 1 plus the socket buffers. Pipelined twice in one packet, so the worker
    # must wait for the first answer to drain before it serves the second: a client that never
    # reads parks that worker (without a send timeout, for as long as it keeps the socket).
    body = http_request("/caption-api", CaptionRequest(("never read",) * 64).to_bytes()) * 2
    held: list[socket.socket] = []

    def attack(stop):
        try:
            while not stop.is_set() and len(held) < 12:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", port_of(url)))
                s.sendall(body)
                held.append(s)
                stop.wait(0.3)
            stop.wait(10)
        finally:
            for s in held:
                s.close()

    log_before = len(proc.log.read_text(errors="replace"))
    under_attack(url, expected, attack, seconds=8)
    log = proc.log.read_text(errors="replace")[log_before:]
    assert "the client read none of its answer" in log, log[-3000:]


# --------------------------------------------------------------------------------------------
# 2. Slow connections
# --------------------------------------------------------------------------------------------

def test_slow_header_dribblers_do_not_lock_anyone_out(url, expected):
    port = port_of(url)
    # 150 connections from one address (over its budget of 100) and 100 more from 100 other
    # loopback addresses: together over waitress' old limit of 100 connections.
    sources = ["127.0.0.2"] * 150 + [f"127.0.1.{i}" for i in range(1, 101)]
    socks: list[tuple[socket.socket, float]] = []

    def attack(stop):
        for src in sources:
            s = socket.socket()
            s.bind((src, 0))
            s.connect(("127.0.0.1", port))
            s.send(b"POST /caption-api HTTP/1.1\r\n")
            socks.append((s, time.monotonic()))
        for i in range(8):                        # one header line every 0.5 s
            if stop.wait(0.5):
                break
            for s, _ in socks:
                try:
                    s.send(f"X-Slow-{i}: {i}\r\n".encode())
                except OSError:                   # the server has closed it: what we want
                    pass

    under_attack(url, expected, attack, seconds=5)
    try:
        deadline = HEADER_TIMEOUT + 2.5               # the 1 s maintenance tick, plus slack
        late = [s for s, opened in socks
                if not closed_by_server(s, max(0.1, opened + deadline - time.monotonic()))]
        assert len(socks) == len(sources) and not late, f"{len(late)} dribblers still open"
    finally:
        for s, _ in socks:
            s.close()


def test_connections_over_the_per_address_budget_get_a_503(url):
    socks = []
    try:
        for _ in range(PER_IP + 5):
            s = socket.socket()
            s.bind(("127.0.0.3", 0))
            s.connect(("127.0.0.1", port_of(url)))
            socks.append(s)
        s = socks[-1]
        s.settimeout(5)
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------
# 3. Cost limits
# --------------------------------------------------------------------------------------------

def test_vae_cost_limits_are_flags_shown_in_info(url):
    info = requests.get(url + "/info", timeout=5).json()
    limits, connections = info["limits"], info["connections"]
    assert (limits["max_video_frames"], limits["max_video_side"], limits["max_video_area"]) == \
        (34, 256, 32768)
    assert (connections["header_timeout"], connections["send_timeout"],
            connections["max_connections_per_ip"], limits["max_wait_in_line"]) == \
        (HEADER_TIMEOUT, SEND_TIMEOUT, PER_IP, 10)
    cases = {"frames": (1, 9, Z, 1, 1), "side": (1, 3, Z, 17, 1), "area": (1, 3, Z, 12, 12),
             "issue 64x64": (1, 3, Z, 64, 64), "issue 3000 frames": (1, 3000, Z, 1, 1)}
    for name, shape in cases.items():
        start = time.monotonic()
        r = post(url + "/vae-api", VAERequest(torch.zeros(shape, dtype=torch.bfloat16)).to_bytes())
        assert r.status_code == 422 and "--max_video" in r.json()["error"], (name, r.text)
        assert time.monotonic() - start < 2, name
    ok = post(url + "/vae-api", VAERequest(torch.zeros(1, 6, Z, 1, 2), "uint8").to_bytes())
    assert ok.status_code == 200


def test_default_cost_limits_fit_the_supported_videos_and_apply_in_process():
    from stepvideo.service.server import AppLimits, ServiceModels, create_app

    limits = VAELimits(z_channels=64)
    for h, w in ((45, 80), (80, 45), (34, 62)):     # 720x1280, 1280x720, 544x992
        VAERequest(torch.empty(1, 36, 64, h, w, dtype=torch.bfloat16)).validate(limits)

    class NeverVAE:
        z_channels = Z

        def decode(self, latents):
            raise AssertionError("a request over the cost limits reached the model")

        decode_uint8 = decode

    client = create_app(ServiceModels(vae=NeverVAE())).test_client()
    for shape in ((1, 3, Z, 64, 64), (1, 3000, Z, 1, 1), (1, 3, Z, 81, 1)):
        r = client.post("/vae-api", content_type=CONTENT_TYPE,
                        data=VAERequest(torch.zeros(shape, dtype=torch.bfloat16)).to_bytes())
        assert r.status_code == 422 and "--max_video" in r.json["error"], shape
    info = client.get("/info").json["limits"]
    default = AppLimits()
    assert (info["max_video_frames"], info["max_video_side"], info["max_video_area"]) == \
        (default.max_video_frames, default.max_video_side, default.max_video_area) == \
        (204, 1280, 1280 * 720)


def _attention_peak_bytes(attn, x) -> int:
    from tests.test_vae import peak_cpu_bytes

    with torch.no_grad():
        return peak_cpu_bytes(lambda: attn(x))


def test_vae_attention_never_materialises_an_n_by_n_matrix():
    from stepvideo.vae.vae import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(64).eval()
    x = torch.randn(1, 64, 2, 64, 64)                      # N = 8192 tokens
    n = x[0, 0].numel()
    peak = _attention_peak_bytes(attn, x)
    # The math path needs a bool mask (N^2 bytes) and fp32 scores (4 N^2); the fused one O(N C).
    assert peak < n * n, f"peak {peak / 2**20:.1f} MiB for N = {n}"


def test_vae_attention_matches_the_masked_reference():
    from stepvideo.vae.vae import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(64).eval()
    x = torch.randn(1, 64, 2, 8, 8)
    with torch.no_grad():
        got = attn(x)
        b, c, t, h, w = x.shape
        n = attn.norm(x)
        q, k, v = (p(n).flatten(2).transpose(1, 2).double() for p in (attn.q, attn.k, attn.v))
        s = q @ k.transpose(1, 2) / c ** 0.5
        s = s.masked_fill(~torch.ones(t * h * w, t * h * w, dtype=torch.bool).tril(), -torch.inf)
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, c, t, h, w).float()
        want = attn.proj_out(a).add_(x)
    # fp32 against a float64 reference: each output is a length-C dot product (scores) feeding a
    # softmax-weighted sum of N values, then a length-C projection; Higham's gamma_m = m u /
    # (1 - m u) with u = 2^-24 and m = 2 C + N bounds the relative error of those sums.
    u, m = 2.0 ** -24, 2 * c + t * h * w
    gamma = m * u / (1 - m * u)
    scale = v.abs().max().item() * attn.proj_out.conv.weight.abs().sum(1).max().item()
    assert (got - want).abs().max().item() <= gamma * max(scale, 1.0) * 4


# --------------------------------------------------------------------------------------------
# 4. Cheap, bounded parsing
# --------------------------------------------------------------------------------------------

def zero_size_tensors(count: int) -> bytes:
    tensors = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
               for i in range(count)}
    return message("vae_request", tensors=tensors)


def test_many_or_unknown_tensors_are_refused_from_the_header():
    body = zero_size_tensors(250_000)                      # the 15.6 MB header
    for parse in (VAERequest.from_bytes, CaptionRequest.from_bytes):
        start = time.monotonic()
        with pytest.raises(MalformedMessage) as err:
            parse(body)
        assert time.monotonic() - start < 1.5 and len(str(err.value)) < 300
    assert "bytes of JSON outside strings" in str(err.value)
    with pytest.raises(MalformedMessage, match=r"'t0', 't1', 't2' and 497 more; it takes only"):
        VAERequest.from_bytes(zero_size_tensors(500))
    # Unknown names are refused before the data is looked at: the header declares 250 MB that
    # the body does not even carry.
    huge = message("vae_request", tensors={"junk": {"dtype": "U8", "shape": [250 << 20],
                                                     "data_offsets": [0, 250 << 20]}})
    with pytest.raises(MalformedMessage, match="unexpected tensor"):
        VAERequest.from_bytes(huge)
    nine = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(9)}
    with pytest.raises(MalformedMessage, match="at most 8"):
        decode_message(message("x", tensors=nine), "x")


def test_parallel_huge_headers_do_not_block_health(url, expected):
    body = zero_size_tensors(250_000)

    def attack(stop):
        def one():
            while not stop.is_set():
                r = post(url + "/vae-api", body)
                assert r.status_code == 400 and len(r.content) < 2 * MAX_ERROR_CHARS

        threads = [threading.Thread(target=one, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)

    under_attack(url, expected, attack, seconds=5)


# --------------------------------------------------------------------------------------------
# 5. Malformed input is a 4xx
# --------------------------------------------------------------------------------------------

def _bad_bodies() -> dict[str, tuple[str, bytes]]:
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    big = "9" * 5000
    latents = {"dtype": "F32", "shape": [1, 3, Z, 1, 1], "data_offsets": [0, 4 * 3 * Z]}
    data = bytes(4 * 3 * Z)
    cases = {
        "nested header": ("/vae-api", raw_header(deep)),
        "nested fields": ("/caption-api", message("caption_request", '{"p":' * 100_000 + "1"
                                                  + "}" * 100_000)),
        "huge int in header": ("/vae-api", raw_header(
            ('{"latents": {"dtype": "F32", "shape": [' + big + '], "data_offsets": [0, 4]}}')
            .encode(), bytes(4))),
        "huge int in fields": ("/caption-api", message("caption_request",
                                                       '{"prompts": ' + big + "}")),
        "fields int": ("/caption-api", message("caption_request", meta={
            "protocol": PROTOCOL, "kind": "caption_request", "fields": 5})),
        "fields object": ("/caption-api", message("caption_request", meta={
            "protocol": PROTOCOL, "kind": "caption_request", "fields": {"prompts": ["a"]}})),
        "fields null": ("/caption-api", message("caption_request", meta={
            "protocol": PROTOCOL, "kind": "caption_request", "fields": None})),
        "fields json int": ("/caption-api", message("caption_request", "5")),
        "fields json null": ("/caption-api", message("caption_request", "null")),
        "lone surrogate": ("/caption-api", message("caption_request",
                                                   '{"prompts": ["a \\ud800 b"]}')),
    }
    for dtype, bits in (("F4", 4), ("F6_E2M3", 6), ("F8_E8M0", 8)):   # sizes that fit the shape
        size = 3 * Z * bits // 8
        cases[f"dtype {dtype}"] = ("/vae-api", message(
            "vae_request", '{"output": "float"}',
            {"latents": {**latents, "dtype": dtype, "data_offsets": [0, size]}}, bytes(size)))
    cases["control"] = ("/vae-api", message("vae_request", '{"output": "float"}',
                                            {"latents": latents}, data))
    return cases


def test_malformed_input_is_a_4xx_json_error(served):
    proc, url = served
    log_before = len(proc.log.read_text(errors="replace"))
    for name, (endpoint, body) in _bad_bodies().items():
        r = post(url + endpoint, body)
        if name == "control":
            assert r.status_code == 200, r.text
            continue
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        assert r.json()["error"] and "internal error" not in r.json()["error"], name
        assert len(r.content) < 2 * MAX_ERROR_CHARS, name
    log = proc.log.read_text(errors="replace")[log_before:]
    assert "Traceback" not in log and "model failed" not in log, log[-3000:]
    caption = requests.get(url + "/info", timeout=5).json()["models"]["caption"]
    assert caption["failed"] == 0


# --------------------------------------------------------------------------------------------
# 6. Tokens, and a port already in use
# --------------------------------------------------------------------------------------------

def _start(model_dir: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SERVER), "--model_dir", model_dir, *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "STEPVIDEO_API_TOKEN": "", **(env or {})})


def test_whitespace_and_non_ascii_tokens_are_refused_at_startup(tiny_model_dir, monkeypatch):
    from stepvideo.service.server import ServerOptions, ServiceConfigError, check_bind

    port = str(free_port())
    for args, words in ((("--token", "   "), "refusing to listen on 0.0.0.0 without a token"),
                        (("--token", "s3crét"), "not printable ASCII")):
        out = _start(tiny_model_dir, "--host", "0.0.0.0", "--port", port, *args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-2000:])
    # The same rules for the environment variable, in process.
    monkeypatch.setenv("STEPVIDEO_API_TOKEN", " \t ")
    token = ServerOptions("m", host="0.0.0.0").resolved_token()
    with pytest.raises(ServiceConfigError, match="without a token"):
        check_bind("0.0.0.0", token)
    monkeypatch.setenv("STEPVIDEO_API_TOKEN", "a\u00a0b")
    with pytest.raises(ServiceConfigError, match="not printable ASCII"):
        ServerOptions("m", host="0.0.0.0").resolved_token()
    monkeypatch.setenv("STEPVIDEO_API_TOKEN", "  fine-token\n")
    assert ServerOptions("m").resolved_token() == "fine-token"


def test_client_raises_service_error_for_unsendable_tokens_and_prompts(url):
    with pytest.raises(ServiceError, match="printable ASCII"):
        RemoteTextEncoder(url, token="s3crét")
    with pytest.raises(ServiceError, match="prompt 1 is not valid Unicode") as err:
        RemoteTextEncoder(url).encode(["fine", "lone \ud800 surrogate"])
    assert err.value.service == "caption"


def test_port_in_use_is_one_error_line_and_exit_2(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _start(tiny_model_dir, "--port", str(port))
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"port {port}" in errors[0] and "already in use" in errors[0]
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------------------------
# 7. Fair under load
# --------------------------------------------------------------------------------------------

def test_backoff_has_jitter_and_keeps_its_budget():
    policy = RetryPolicy(max_wait=20, initial_backoff=0.5, max_backoff=4, jitter=0.5)
    a = list(policy.delays(random.Random(1)))
    b = list(policy.delays(random.Random(2)))
    assert a != b and abs(sum(a) - 20) < 1e-9 and abs(sum(b) - 20) < 1e-9
    for i, d in enumerate(a[:-1]):
        nominal = min(0.5 * 2 ** i, 4)
        assert nominal / 2 <= d <= nominal
    assert list(RetryPolicy(max_wait=3, jitter=0).delays()) == [0.5, 1.0, 1.5]


def test_model_line_is_first_come_first_served_and_bounded():
    from stepvideo.service.server import ModelSlot, ServiceUnavailable

    slot = ModelSlot("vae", max_pending=8, max_wait=5)
    slot.set_state("ready", "loaded", model="m")
    order: list[int] = []
    release = threading.Event()

    def hold():
        with slot.use():
            release.wait(10)

    def request(i: int):
        with slot.use():
            order.append(i)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    waiters = []
    for i in range(6):                       # arrive in order while the model is busy
        waiters.append(threading.Thread(target=request, args=(i,)))
        waiters[-1].start()
        time.sleep(0.05)
    release.set()
    for t in [holder, *waiters]:
        t.join(10)
    assert order == list(range(6))

    slow = ModelSlot("vae", max_pending=8, max_wait=0.3)
    slow.set_state("ready", "loaded", model="m")
    release.clear()
    holder = threading.Thread(target=lambda: slow.run(lambda m: release.wait(10)))
    holder.start()
    time.sleep(0.1)
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="waited 0.3 s in line") as err:
        slow.run(lambda m: None)
    assert err.value.retryable and 0.25 < time.monotonic() - start < 2
    release.set()
    holder.join(10)
    assert slow.summary()["timed_out_in_line"] == 1 and slow.pending == 0


# --------------------------------------------------------------------------------------------
# The README's reverse-proxy example
# --------------------------------------------------------------------------------------------

def readme_nginx_server_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("**Behind a reverse proxy.**", 1)[1].split("```nginx\n", 1)[1]
    return block.split("```", 1)[0]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_readme_reverse_proxy_config_serves_and_drops_slow_headers(url, expected, tmp_path):
    block = readme_nginx_server_block()
    port = free_port()
    for old, new in (("listen 443 ssl;", f"listen 127.0.0.1:{port};"),
                     ("http://127.0.0.1:8080", url), ("client_header_timeout 10s",
                                                       "client_header_timeout 2s")):
        assert old in block, old
        block = block.replace(old, new)
    temp = "".join(f"{kind}_temp_path {tmp_path}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
                    f"http {{\naccess_log off;\n{temp}{block}}}\n", encoding="utf-8")
    proc = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proxied = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(proxied + "/health", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        probe(proxied, expected)
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.send(b"POST /caption-api HTTP/1.1\r\n")
            assert closed_by_server(slow, within=4)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
