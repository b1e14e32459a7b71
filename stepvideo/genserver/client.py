"""A small client of the generation server (``run_parallel.py --serve``) for scripts, tests and
the prompt-suite runner's ``--server URL``.

    client = GenerationClient("http://127.0.0.1:8000")
    job = client.wait(client.submit(prompt="a red kite", seed=1)["id"])
    client.download(job["id"], "kite.mp4")
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

from ..fileio import write_bytes_atomic
from ..service.protocol import TOKEN_ENV


class GenerationError(RuntimeError):
    """The server answered with an error (``status``), could not be reached, or a job failed."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class GenerationClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs):
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            r = requests.request(method, self.url + path, headers=headers,
                                 timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise GenerationError(f"generation server at {self.url} unreachable: {e}") from e
        if not r.ok:
            try:
                message = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise GenerationError(f"{method} {path}: {r.status_code}: {message}", r.status_code)
        return r

    def info(self) -> dict[str, Any]:
        return self._call("GET", "/info").json()

    def submit(self, **fields: Any) -> dict[str, Any]:
        return self._call("POST", "/v1/videos", json=fields).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/videos/{job_id}").json()

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/videos").json()["data"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/videos/{job_id}").json()

    def content(self, job_id: str, variant: str = "video") -> bytes:
        return self._call("GET", f"/v1/videos/{job_id}/content",
                          params={"variant": variant}).content

    def download(self, job_id: str, path: str | os.PathLike, variant: str = "video") -> str:
        return write_bytes_atomic(path, self.content(job_id, variant))

    def wait(self, job_id: str, timeout: float = 3600.0, poll: float = 0.2) -> dict[str, Any]:
        """Poll until the job is over; returns it (whatever its status) or raises on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise GenerationError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) from ``/events`` until the server ends the stream."""
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        with requests.get(f"{self.url}/v1/videos/{job_id}/events", headers=headers,
                          stream=True, timeout=self.timeout) as r:
            if not r.ok:
                raise GenerationError(f"events of {job_id}: {r.status_code}: {r.text[:300]}",
                                      r.status_code)
            event, data = "message", []
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield event, json.loads("\n".join(data))
                    event, data = "message", []
