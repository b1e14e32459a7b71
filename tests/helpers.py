"""What several test modules share: the repository paths and the caption/VAE service as a
subprocess (``from tests.helpers import ...``). Fixtures live in ``tests/conftest.py``."""

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from stepvideo.parallel import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "api" / "call_remote_server.py"


def start_service(model_dir: str, *extra_args: str, port: int | None = None,
                  env: dict | None = None, log: Path | None = None, wait: bool = True,
                  timeout: float = 120.0, command: list[str] | None = None,
                  cwd: str | Path = ROOT) -> tuple[subprocess.Popen, str]:
    """Start ``api/call_remote_server.py`` (or ``command``, e.g. an installed ``stepvideo-server``)
    on 127.0.0.1 and return (proc, "http://127.0.0.1:PORT").

    Output goes to ``log`` (a temporary file by default; its path is ``proc.log``). With ``wait``
    it polls /health until "ready" and fails the test with the server's log if the server exits,
    reports "failed" or is not ready within ``timeout`` seconds."""
    port = port or free_port()
    if log is None:
        fd, name = tempfile.mkstemp(prefix="stepvideo-service-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with open(log, "ab") as f:
        proc = subprocess.Popen([*(command or [sys.executable, str(SERVER)]), "--model_dir",
                                 model_dir, "--port", str(port), *extra_args],
                                stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})})
    proc.log = Path(log)
    url = f"http://127.0.0.1:{port}"
    if wait:
        try:
            wait_service_ready(proc, url, timeout)
        except BaseException:
            stop_service(proc)
            raise
    return proc, url


def wait_service_ready(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    import requests

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"service exited with {proc.returncode}:\n{_log_text(proc)}")
        try:
            last = requests.get(url + "/health", timeout=2).json()
        except (requests.ConnectionError, requests.Timeout, ValueError) as e:
            last = repr(e)
        if isinstance(last, dict) and last.get("status") == "ready":
            return
        if isinstance(last, dict) and last.get("status") == "failed":
            pytest.fail(f"service failed to load: {last}\n{_log_text(proc)}")
        time.sleep(0.2)
    pytest.fail(f"service not ready after {timeout} s (last /health: {last}):\n{_log_text(proc)}")


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@contextlib.contextmanager
def running_service(model_dir: str, *extra_args: str, **kwargs):
    """``start_service`` as a context manager: yields (proc, url) and stops the server after."""
    proc, url = start_service(model_dir, *extra_args, **kwargs)
    try:
        yield proc, url
    finally:
        stop_service(proc)


def _log_text(proc: subprocess.Popen) -> str:
    return Path(proc.log).read_text(encoding="utf-8", errors="replace")[-20000:]
