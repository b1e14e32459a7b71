"""Load benchmark of the caption/VAE service: N concurrent clients through the project's client.

    python benchmark/perf/service_load.py [--clients 16 64] [--requests 4] [--url URL]

Without ``--url`` it writes the tiny model to a temporary directory and starts
``api/call_remote_server.py`` on 127.0.0.1 (CPU, default flags). Each client thread makes
``--requests`` calls, alternating caption (a fresh prompt, so the cache does not answer) and VAE
(uint8 frames of random (1, 3, z, 2, 2) latents), with :class:`RemoteTextEncoder` /
:class:`RemoteVAE` and their default retry policy. A warm-up call of each kind is excluded.

It prints, per client count: throughput, p50 / p99 / max latency per endpoint (a client's view,
retries included), errors, and the server's RSS before and after; the JSON goes to
``benchmark/results/service_load_<host>.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

from stepvideo.fileio import write_json_atomic
from stepvideo.service.client import RemoteTextEncoder, RemoteVAE

ROOT = Path(__file__).resolve().parents[2]


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(port: int) -> tuple[subprocess.Popen, str]:
    from stepvideo.tiny import write_tiny_model

    model_dir = write_tiny_model(tempfile.mkdtemp(prefix="stepvideo-load-"), seed=0)
    log = open(os.path.join(model_dir, "server.log"), "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "api" / "call_remote_server.py"),
                             "--model_dir", model_dir, "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    RemoteTextEncoder(url).wait_ready(timeout=300)
    return proc, url


def run_clients(url: str, clients: int, per_client: int, z: int) -> dict:
    latencies: dict[str, list[float]] = {"caption": [], "vae": []}
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        text, vae = RemoteTextEncoder(url), RemoteVAE(url)
        gen = torch.Generator().manual_seed(i)
        barrier.wait()
        for j in range(per_client):
            kind = "caption" if (i + j) % 2 == 0 else "vae"
            start = time.monotonic()
            try:
                if kind == "caption":
                    out = text.encode([f"client {i} request {j}: a red kite over the sea"]).y
                    assert out.shape[0] == 1
                else:
                    out = vae.decode_uint8(torch.randn(1, 3, z, 2, 2, generator=gen))
                    assert out.shape == (1, 17, 32, 32, 3)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")
                continue
            with lock:
                latencies[kind].append(time.monotonic() - start)

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.monotonic() - start
    done = sum(len(v) for v in latencies.values())
    return {"clients": clients, "requests": clients * per_client, "ok": done,
            "errors": len(errors), "first_errors": errors[:5], "wall_s": round(wall, 2),
            "throughput_rps": round(done / wall, 2),
            **{f"{k}_{name}_s": (round(v, 3) if v is not None else None)
               for k, lat in latencies.items()
               for name, v in (("p50", percentile(lat, 0.5)), ("p99", percentile(lat, 0.99)),
                               ("max", max(lat) if lat else None))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    p.add_argument("--requests", type=int, default=4, help="calls per client")
    p.add_argument("--url", default=None, help="a running server (default: start a tiny one)")
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--out", default=str(ROOT / "benchmark" / "results" /
                                        f"service_load_{platform.node() or 'host'}.json"))
    a = p.parse_args()
    proc, url = (None, a.url) if a.url else start_server(a.port)
    try:
        info = requests.get(url + "/info", timeout=10).json()
        z = info["models"]["vae"]["z_channels"]
        RemoteTextEncoder(url).encode(["warm-up"])
        RemoteVAE(url).decode_uint8(torch.randn(1, 3, z, 2, 2))
        pid = proc.pid if proc else None
        runs = []
        for clients in a.clients:
            before = rss_mib(pid)
            run = run_clients(url, clients, a.requests, z)
            run.update(server_rss_before_mib=before, server_rss_after_mib=rss_mib(pid))
            runs.append(run)
            print(json.dumps(run))
        result = {"benchmark": "service_load", "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__},
            "server": {"url": url, "started_here": proc is not None, "limits": info["limits"],
                       "connections": info.get("connections")}, "runs": runs}
        write_json_atomic(a.out, result)
        print(f"wrote {a.out}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
