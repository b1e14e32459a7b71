"""The generation server (``run_parallel.py --serve``) on the tiny model: torchrun with 2 ranks
(Ulysses 2, CPU, gloo), local encoders and VAE, real HTTP on 127.0.0.1. Jobs give the CLI's
frames; SSE delivers every step; a cancel stops both ranks at one step boundary and the next job
is unchanged; a full queue answers 429; bad jobs 400/422; the web page works in headless
Chromium; a restarted server lists earlier jobs and fails the one a kill interrupted. The job
schema, store and token rule are also tested without processes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from stepvideo.genserver.client import GenerationClient, GenerationError
from stepvideo.genserver.jobs import JobError, JobLimits, JobSpec, JobStore, parse_spec
from stepvideo.video_io import read_frames
from tests.helpers import ROOT, free_port
from tests.test_benchmark import CHROMIUM, kill_groups

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MODEL_FLAGS = ["--caption_url", "local", "--vae_url", "local", "--ulysses_degree", "2",
               "--num_frames", "17", "--height", "64", "--width", "64", "--infer_steps", "3"]
DEFAULTS = JobSpec("", "neg", 1, 17, 64, 64, 3, 9.0, 13.0)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(ROOT / "run_parallel.py"), *args]


def start_server(model_dir: str, save: Path, log: Path, *extra: str):
    port = free_port()
    with open(log, "ab") as f:
        proc = subprocess.Popen(torchrun("--serve", "--port", str(port), "--model_dir", model_dir,
                                         *MODEL_FLAGS, "--save_path", str(save), *extra),
                                stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            if requests.get(url + "/health", timeout=2).json()["status"] == "ready":
                return proc, url
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.3)
    kill_groups(proc)
    pytest.fail(f"server not ready:\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The server, and the CLI's video of the first job (seed 11) made while the server loads."""
    save = tmp_path_factory.mktemp("genserver")
    cli = subprocess.Popen(torchrun("--model_dir", tiny_model_dir, *MODEL_FLAGS, "--prompt",
                                    "a lighthouse in a storm", "--seed", "11", "--save_path",
                                    str(save / "cli")),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        proc, url = start_server(tiny_model_dir, save, save / "server.log", "--max_queue", "2")
    except BaseException:
        cli.kill()
        raise
    state = {"proc": proc, "url": url, "save": save, "model_dir": tiny_model_dir, "done": {},
             "cli": cli}
    yield state
    kill_groups(state["proc"])
    if cli.poll() is None:
        cli.kill()


def finished(client: GenerationClient, job_id: str, status: str = "completed") -> dict:
    job = client.wait(job_id, timeout=120, poll=0.05)
    assert job["status"] == status, job
    return job


def frames_of(client: GenerationClient, job_id: str, tmp: Path) -> np.ndarray:
    return read_frames(client.download(job_id, tmp / f"{job_id}.mp4"))


def test_jobs_give_the_cli_video(server, tmp_path):
    client = GenerationClient(server["url"])
    a = client.submit(prompt="a lighthouse in a storm", seed=11)
    b = client.submit(prompt="a lighthouse in a storm", seed=12)
    assert a["status"] == "queued" and a["steps"] == 3 and a["height"] == 64
    ja, jb = finished(client, a["id"]), finished(client, b["id"])
    assert ja["progress"] == 100 and ja["step"] == 3 and ja["finished_at"] >= ja["started_at"]
    fa, fb = frames_of(client, a["id"], tmp_path), frames_of(client, b["id"], tmp_path)
    server["done"][11] = (a["id"], fa)

    out, _ = server["cli"].communicate(timeout=300)
    assert server["cli"].returncode == 0, out[-3000:]
    expected = read_frames(next((server["save"] / "cli").glob("*seed11.mp4")))
    assert fa.shape == (17, 64, 64, 3) and np.array_equal(fa, expected)
    assert np.abs(fa.astype(int) - fb.astype(int)).mean() > 1.0

    sidecar = json.loads(client.content(a["id"], "sidecar"))
    assert sidecar["seed"] == 11 and sidecar["degrees"]["world_size"] == 2
    assert client.content(a["id"], "contact_sheet")[:8] == b"\x89PNG\r\n\x1a\n"
    listed = [j["id"] for j in client.list()]
    assert listed.index(b["id"]) < listed.index(a["id"])        # newest first
    r = requests.get(f"{server['url']}/v1/videos/{a['id']}/content")
    assert r.headers["Content-Type"] == "video/mp4"


def test_events_deliver_every_step(server):
    client = GenerationClient(server["url"])
    job = client.submit(prompt="a paper boat", seed=3, infer_steps=5)
    events = list(client.events(job["id"]))
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == [1, 2, 3, 4, 5], events
    statuses = [d["status"] for e, d in events if e == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "completed" and "in_progress" in statuses
    assert [d["progress"] for e, d in events if e == "progress"] == [20, 40, 60, 80, 99]


def test_cancel_full_queue_and_the_ranks_stay_in_step(server, tmp_path):
    client = GenerationClient(server["url"])
    long = client.submit(prompt="a slow river", seed=5, infer_steps=200)
    deadline = time.monotonic() + 60
    while client.get(long["id"])["step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    queued = [client.submit(prompt=f"waiting {i}") for i in range(2)]      # --max_queue 2
    with pytest.raises(GenerationError) as full:
        client.submit(prompt="one too many")
    assert full.value.status == 429 and "queue is full" in str(full.value)

    assert client.cancel(queued[0]["id"])["status"] == "cancelled"       # queued: at once
    stopping = client.cancel(long["id"])
    assert stopping["status"] == "in_progress" and stopping["cancel_requested"]
    job = finished(client, long["id"], "cancelled")
    assert 2 <= job["step"] < 200 and "cancelled after step" in job["error"]
    assert not list((server["save"] / "jobs" / long["id"]).glob("*.mp4"))
    with pytest.raises(GenerationError) as over:
        client.cancel(long["id"])
    assert over.value.status == 409
    finished(client, queued[1]["id"])

    # Both ranks left the cancelled job at the same step: the next job is the same video as before.
    again = client.submit(prompt="a lighthouse in a storm", seed=11)
    finished(client, again["id"])
    if 11 in server["done"]:
        assert np.array_equal(frames_of(client, again["id"], tmp_path), server["done"][11][1])


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "x", "num_frames": 0}, 422, "'num_frames'"),
    ({"prompt": "x", "height": 10}, 422, "'height' 10 is below 16"),
    ({"prompt": "x", "infer_steps": 0}, 422, "'infer_steps' must be between 1 and 200"),
    ({"prompt": "x", "height": 4096}, 422, "above this server's limit"),
    ({"prompt": "   "}, 422, "'prompt' is empty"),
    ({"prompt": "x", "seed": "7"}, 400, "'seed' must be a number"),
    ({"prompt": "x", "steps": 3}, 400, "unknown field(s) steps"),
    ({"seed": 3}, 400, "'prompt' is required"),
    (["x"], 400, "JSON object"),
])
def test_invalid_jobs_are_refused(server, body, status, message):
    r = requests.post(server["url"] + "/v1/videos", json=body, timeout=10)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert requests.get(server["url"] + "/health", timeout=10).json()["status"] == "ready"


def test_bad_requests_get_json_errors(server):
    url = server["url"]
    r = requests.post(url + "/v1/videos", data="{bad", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = requests.post(url + "/v1/videos", data="prompt=x", timeout=10)
    assert r.status_code == 415
    r = requests.post(url + "/v1/videos", json={"prompt": "x" * 100_000}, timeout=10)
    assert r.status_code == 413 and r.json()["service"] == "generation"
    assert requests.get(url + "/v1/videos/nope", timeout=10).status_code == 404
    info = requests.get(url + "/info", timeout=10).json()
    assert info["degrees"]["world_size"] == 2 and info["limits"]["max_queue"] == 2
    assert info["defaults"]["infer_steps"] == 3 and info["auth"].startswith("none")


# --------------------------------------------------------------------------------------------
# The web page in headless Chromium (DevTools protocol over --remote-debugging-pipe)
# --------------------------------------------------------------------------------------------

def _above_4(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Chromium:
    """Headless Chromium driven over its DevTools pipe (fds 3 and 4, NUL-terminated JSON)."""

    def __init__(self, tmp: Path):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        to_r, from_w = _above_4(to_r), _above_4(from_w)   # bash then puts them on 3 and 4
        cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', CHROMIUM, "--headless",
               "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
               "--disable-background-networking", "--disable-component-update",
               "--autoplay-policy=no-user-gesture-required", "--remote-debugging-pipe",
               f"--user-data-dir={tmp / 'chromium-profile'}"]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ,
                                                                     "HOME": str(tmp)})
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id, self.session = b"", 0, None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=1200, height=900,
                  deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from, 1 << 20)
                assert chunk, "chromium closed its DevTools pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        pytest.fail(f"page never satisfied {expression!r}; body: "
                    f"{self.eval('document.body.innerText')[:2000]}")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot",
                                                    format="png")["data"]))
        return path

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._to)
        os.close(self._from)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing")
def test_web_page_submits_and_plays(server, tmp_path, capsys):
    browser = Chromium(tmp_path)
    try:
        browser.send("Page.navigate", url=server["url"] + "/")
        browser.wait_for("document.getElementById('model').textContent.includes('world size 2')")
        browser.eval("window.seen=[]; setInterval(function(){document.querySelectorAll("
                     "'.job[data-status=in_progress] progress').forEach(function(p){"
                     "window.seen.push(p.value);});}, 50); 1")
        browser.eval("document.getElementById('prompt').value='a lantern over a lake';"
                     "document.querySelector('[name=infer_steps]').value='24';"
                     "document.querySelector('[name=seed]').value='9';"
                     "document.getElementById('submit').click(); 1")
        job_id = browser.wait_for("(function(){var c=[...document.querySelectorAll('.job')]"
                                  ".find(function(c){return c.querySelector('.prompt')"
                                  ".textContent==='a lantern over a lake';});"
                                  "return c&&c.dataset.id;})()", timeout=20)
        card = f"document.querySelector('.job[data-id={job_id}]')"
        browser.wait_for(f"{card}.dataset.status==='completed' && {card}.querySelector('video')"
                         f" && {card}.querySelector('video').readyState>=2")
        seen = browser.eval("window.seen")
        assert len({v for v in seen if 0 < v < 100}) >= 2, seen      # the bar moved
        assert browser.eval(f"{card}.querySelector('video').videoWidth") == 64
        assert browser.eval("performance.getEntriesByType('resource').some(function(e){"
                            f"return e.name.endsWith('/v1/videos/{job_id}/events');}})"), \
            "the page did not follow the job's event stream"
        assert "24" in browser.eval(f"{card}.querySelector('table').innerText")
        shot = browser.screenshot(tmp_path / "page.png")
    finally:
        browser.close()
    assert shot.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nweb page screenshot: {shot}")


def test_suite_runner_submits_to_the_server(server, tmp_path, capsys):
    from stepvideo.suite import read_manifest
    from stepvideo.suite_runner import main as suite_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse in a storm\n" + "x" * 5000 + "\n", encoding="utf-8")
    save = tmp_path / "suite"
    args = ["--server", server["url"], "--prompts", str(prompts), "--save_path", str(save),
            "--seed", "11", "--num_frames", "17", "--height", "64", "--width", "64",
            "--infer_steps", "3"]
    assert suite_main(args, gallery=None) == 0
    records = {r.index: r for r in read_manifest(save)}
    assert records[1].status == "ok" and records[2].status == "failed"
    assert "422" in records[2].reason and "4000" in records[2].reason
    video = save / records[1].outputs["video"]
    if 11 in server["done"]:
        assert np.array_equal(read_frames(video), server["done"][11][1])
    side = json.loads((save / records[1].outputs["sidecar"]).read_text())
    assert side["outputs"]["video"] == str(video) and side["server_job"]["url"] == server["url"]
    assert suite_main(args, gallery=None) == 0                     # the rerun skips the video
    assert "1 already done, 1 to run" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Restart (last: it kills the module's server)
# --------------------------------------------------------------------------------------------

def test_restart_lists_earlier_jobs(server, tmp_path):
    client = GenerationClient(server["url"])
    before = {j["id"]: j["status"] for j in client.list()}
    running = client.submit(prompt="cut short", infer_steps=200)
    deadline = time.monotonic() + 60
    while client.get(running["id"])["step"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_groups(server["proc"])                         # SIGKILL: nothing gets to clean up
    proc, url = start_server(server["model_dir"], server["save"], server["save"] / "server2.log")
    server["proc"] = proc
    client = GenerationClient(url)
    after = {j["id"]: j for j in client.list()}
    assert {k: after[k]["status"] for k in before} == before
    assert after[running["id"]]["status"] == "failed"
    assert "interrupted" in after[running["id"]]["error"]
    if 11 in server["done"]:
        job_id, frames = server["done"][11]
        assert np.array_equal(frames_of(client, job_id, tmp_path), frames)


# --------------------------------------------------------------------------------------------
# Without processes: schema, store, token rule
# --------------------------------------------------------------------------------------------

def test_spec_round_trips_through_ints():
    spec, notes = parse_spec({"prompt": "p", "cfg_scale": 7.25, "time_shift": 1e-3,
                              "seed": 2 ** 63 - 1, "height": 70}, DEFAULTS, JobLimits())
    back = JobSpec.from_ints(spec.to_ints())
    assert back == JobSpec("", "", 2 ** 63 - 1, 17, 70, 64, 3, 7.25, 1e-3)
    assert notes == ["'height' 70 rounded down to 64 (a multiple of 16)"]


def test_store_queue_and_recovery(tmp_path):
    store = JobStore(tmp_path, JobLimits(max_queue=2))
    a = store.submit(DEFAULTS, [])
    b = store.submit(DEFAULTS, [])
    with pytest.raises(JobError) as full:
        store.submit(DEFAULTS, [])
    assert full.value.status == 429
    assert store.next_job(0.01).id == a.id and store.next_job(0.01).id == b.id
    store.step(b, 1)
    c = store.submit(DEFAULTS, [])
    store.finish(a, "completed", outputs={"video": "v.mp4"})
    again = JobStore(tmp_path)
    assert again.get(a.id).status == "completed" and again.get(a.id).outputs == {"video": "v.mp4"}
    for job_id, was in ((b.id, "in_progress"), (c.id, "queued")):
        job = again.get(job_id)
        assert job.status == "failed" and f"while this job was {was}" in job.error
    assert again.queue_length() == 0 and again.next_job(0.01) is None


def test_token_rule_and_page(tmp_path):
    from stepvideo.genserver.app import create_app
    from stepvideo.genserver.loop import ServeOptions
    from stepvideo.service.server import ServiceConfigError

    with pytest.raises(ServiceConfigError, match="refusing to listen on 0.0.0.0 without a token"):
        ServeOptions.checked("m", "0.0.0.0", 8000, None, 8)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    assert ServeOptions.checked("m", "0.0.0.0", 8000, str(token_file), 8).token == "s3cret"
    app = create_app(JobStore(tmp_path), DEFAULTS, lambda: {}, "s3cret").test_client()
    assert app.get("/v1/videos").status_code == 401
    assert app.post("/v1/videos", json={"prompt": "x"},
                    headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = app.post("/v1/videos", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 202 and ok.headers["Location"].endswith(ok.json["id"])
    assert app.get("/health").status_code == 200
    page = app.get("/")
    assert page.status_code == 200 and b"<form id=\"submit-form\">" in page.data


class FakeGen:
    """A one-rank stand-in for ``VideoGenerator``: records the loop's broadcasts and calls
    ``on_step`` like the pipeline; ``fail_at`` raises at that step (or after the last)."""

    device = "cpu"

    def __init__(self, fail_at: int | None = None, encode_error: Exception | None = None):
        self.fail_at, self.encode_error, self.sent, self.generated = fail_at, encode_error, [], 0
        self.ctx = self

    is_main, world_size = True, 1

    def broadcast_ints(self, values, device):
        self.sent.append(list(values))
        return list(values)

    def encode_text(self, req):
        if self.encode_error:
            raise self.encode_error
        return "embeddings"

    def generate(self, req, progress, text, on_step):
        self.generated += 1
        for i in range(req.infer_steps):
            if i == self.fail_at:
                raise RuntimeError("boom inside the step")
            on_step(i, None)
        if self.fail_at == req.infer_steps:
            raise RuntimeError("ffmpeg could not write")
        stem = os.path.join(req.save_path, "v")
        return {"outputs": {"video": stem + ".mp4", "sidecar": stem + ".json"}, "frames": 17,
                "width": 64, "height": 64}


def _one_job(tmp_path, gen, cancel_at_step=None):
    from types import SimpleNamespace

    from stepvideo.genserver.loop import run_job
    from stepvideo.runner import GenerationRequest

    store = JobStore(tmp_path)
    store.submit(DEFAULTS, [])
    rank0 = SimpleNamespace(store=store, job=store.next_job(0.01))
    if cancel_at_step is not None:
        step = store.step

        def step_then_cancel(job, n):
            step(job, n)
            job.cancel_requested = job.cancel_requested or n == cancel_at_step

        store.step = step_then_cancel
    run_job(gen, GenerationRequest(model_dir="m"), DEFAULTS, rank0)
    return rank0.job


def test_loop_outcomes_without_processes(tmp_path):
    gen = FakeGen()
    job = _one_job(tmp_path / "ok", gen)
    assert job.status == "completed" and job.outputs == {"video": "v.mp4", "sidecar": "v.json"}
    assert gen.sent == [[0], [0], [0], [0]]           # go, then one stop flag per step

    gen = FakeGen()
    job = _one_job(tmp_path / "cancel", gen, cancel_at_step=1)
    # asked during step 1's report: the ranks stop at the end of step 2, the next boundary
    assert job.status == "cancelled" and job.error == "cancelled after step 2 of 3"
    assert gen.sent == [[0], [0], [1]]

    gen = FakeGen(encode_error=ValueError("prompt too long for the tokenizer"))
    job = _one_job(tmp_path / "caption", gen)
    assert job.status == "failed" and "prompt too long" in job.error
    assert gen.sent == [[1]] and gen.generated == 0    # the other ranks skip the job

    job = _one_job(tmp_path / "write", FakeGen(fail_at=3))   # after the last step: job fails
    assert job.status == "failed" and "ffmpeg could not write" in job.error
    with pytest.raises(RuntimeError, match="boom inside the step"):   # inside: the server stops
        _one_job(tmp_path / "step", FakeGen(fail_at=1))
