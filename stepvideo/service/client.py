"""HTTP clients of the caption/VAE service: ``RemoteTextEncoder`` and ``RemoteVAE``.

They implement the pipeline's backend interfaces (``stepvideo.conditioning``) and return exactly
what the in-process backends (``text_encoder.local.LocalTextEncoder``, ``vae.local.LocalVAE``)
compute, because the server *is* those classes behind HTTP.

URLs: ``normalize_url`` accepts ``host``, ``host:port`` or a full URL. A bare host (no scheme)
gets port :data:`DEFAULT_PORT` (8080, the server's default); a URL with a scheme keeps that scheme's
usual port unless it names one. A trailing endpoint path (``/caption-api``) is dropped, so the
release's style of passing the endpoint URL also works.

Retries: connection failures (refused, reset, connect timeout: the server is down or restarting)
and retryable 503s (the server is still loading its models or a model's queue is full; a 503 for a
model that failed to load is final) are retried with jittered exponential backoff for up to
``RetryPolicy.max_wait`` seconds (jitter, so that clients turned away together do not come back
together). 4xx answers, 500 (a model failed) and read
timeouts are not retried: they raise :class:`ServiceError` naming the service, the URL, the HTTP
status and the server's message.

Token: the ``token`` argument, else the ``STEPVIDEO_API_TOKEN`` environment variable; sent as
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import os
import random
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..conditioning import TextEmbeddings
from .protocol import (CONTENT_TYPE, DEFAULT_PORT, MAX_LATENT_ELEMENTS, MAX_VAE_BATCH, TOKEN_ENV,
                       CaptionRequest, CaptionResponse, ProtocolError, VAERequest, VAEResponse,
                       check_text)

ENDPOINTS = ("/caption-api", "/vae-api", "/health", "/info")


def normalize_url(url: str, default_port: int = DEFAULT_PORT) -> str:
    """``host``, ``host:port`` or ``scheme://host[:port][/prefix]`` ->
    ``scheme://host:port[/prefix]``."""
    text = url.strip()
    if not text:
        raise ValueError("empty service URL; pass host, host:port or http://host:port")
    has_scheme = "://" in text
    parts = urllib.parse.urlsplit(text if has_scheme else "http://" + text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"bad service URL {url!r}: use host, host:port or http(s)://host:port")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad port in service URL {url!r}: {e}") from e
    if port is None:
        port = default_port if not has_scheme else (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    path = parts.path.rstrip("/")
    for endpoint in ENDPOINTS:
        if path.endswith(endpoint):
            path = path[: -len(endpoint)]
    return f"{parts.scheme}://{host}:{port}{path}"


class ServiceError(RuntimeError):
    """A service call failed; names the service, the URL, the status and the server's message."""

    def __init__(self, service: str, url: str, message: str, status: int | None = None):
        self.service, self.url, self.status, self.server_message = service, url, status, message
        where = f"{service} service at {url}"
        super().__init__(f"{where}: HTTP {status}: {message}" if status else f"{where}: {message}")


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for connection failures and 503: 0.5 s, 1 s, 2 s ... capped at ``max_backoff``,
    each drawn uniformly from [(1 - jitter) x, x], for at most ``max_wait`` seconds in all."""

    max_wait: float = 120.0
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    jitter: float = 0.5

    def __post_init__(self):
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delays(self, rng: random.Random | None = None):
        rng = rng or random.Random()
        delay, spent = self.initial_backoff, 0.0
        while spent < self.max_wait:
            step = min(min(delay, self.max_backoff) * (1 - self.jitter * rng.random()),
                       self.max_wait - spent)
            yield step
            spent += step
            delay *= 2


class _RemoteService:
    service = ""
    endpoint = ""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0,
                 connect_timeout: float = 10.0, retry: RetryPolicy = RetryPolicy()):
        self.base_url = normalize_url(url)
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.token = token.strip() if token and token.strip() else None
        if self.token and not all("!" <= c <= "~" for c in self.token):
            raise ServiceError(self.service, self.base_url, "the token has a character that is "
                               "not printable ASCII (or a space); it cannot travel in an HTTP "
                               f"header (check {TOKEN_ENV} or token=)")
        self.timeout, self.connect_timeout, self.retry = timeout, connect_timeout, retry

    @property
    def url(self) -> str:
        return self.base_url + self.endpoint

    def _headers(self, body: bool) -> dict[str, str]:
        headers = {"Accept": f"{CONTENT_TYPE}, application/json"}
        if body:
            headers["Content-Type"] = CONTENT_TYPE
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _send(self, method: str, url: str, body: bytes | None):
        import requests

        return requests.request(method, url, data=body, headers=self._headers(body is not None),
                                timeout=(self.connect_timeout, self.timeout))

    def _call(self, method: str, url: str, body: bytes | None = None, retry: bool = True):
        """One request with the retry policy; returns the response of the last attempt."""
        import requests

        delays = self.retry.delays() if retry else iter(())
        start, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            try:
                response = self._send(method, url, body)
                if not _retryable_503(response):
                    return response
                failure: Any = response
            except requests.ReadTimeout as e:
                raise ServiceError(self.service, url, f"no answer within {self.timeout} s ({e}); "
                                   "raise timeout= for long jobs") from e
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                failure = e
            delay = next(delays, None)
            if delay is None:
                if isinstance(failure, Exception):
                    raise ServiceError(
                        self.service, url, f"unreachable ({attempts} attempt(s) over "
                        f"{time.monotonic() - start:.1f} s): {failure}. Is the server running "
                        "(python api/call_remote_server.py) and is the address right?"
                    ) from failure
                return failure
            time.sleep(delay)

    def _post(self, body: bytes) -> bytes:
        response = self._call("POST", self.url, body)
        if response.status_code != 200:
            raise ServiceError(self.service, self.url, _error_message(response),
                               response.status_code)
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith(CONTENT_TYPE):
            raise ServiceError(self.service, self.url, f"unexpected Content-Type {content_type!r}"
                               f" in a 200 answer (is this a stepvideo service?)")
        return response.content

    def _parse(self, parse: Callable[[bytes], Any], body: bytes):
        try:
            return parse(body)
        except ProtocolError as e:
            raise ServiceError(self.service, self.url, f"bad answer from the server: {e}") from e

    def health(self, retry: bool = False) -> dict[str, Any]:
        """The server's /health JSON (``status``: loading | ready | failed, with the reasons)."""
        response = self._call("GET", self.base_url + "/health", retry=retry)
        return _json_or_error(self.service, self.base_url + "/health", response)

    def info(self) -> dict[str, Any]:
        response = self._call("GET", self.base_url + "/info")
        if response.status_code != 200:
            raise ServiceError(self.service, self.base_url + "/info", _error_message(response),
                               response.status_code)
        return _json_or_error(self.service, self.base_url + "/info", response)

    def wait_ready(self, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll /health until the server reports ready; raise ServiceError on failure or timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.health()
            except ServiceError as e:
                last = str(e)
            if isinstance(last, dict) and last.get("status") == "ready":
                return last
            if isinstance(last, dict) and last.get("status") == "failed":
                raise ServiceError(self.service, self.base_url, "server failed to load its "
                                   f"models: {self._failure_details(last)}")
            time.sleep(poll)
        raise ServiceError(self.service, self.base_url, f"not ready after {timeout} s: {last}")


    def _failure_details(self, health: dict[str, Any]) -> str:
        """Why models failed, from /info (it needs the token, unlike /health)."""
        try:
            response = self._call("GET", self.base_url + "/info", retry=False)
            models = response.json()["models"] if response.status_code == 200 else {}
            failed = [f"{name}: {m['detail']}" for name, m in models.items()
                      if m.get("status") == "failed"]
        except (ServiceError, ValueError, KeyError, TypeError, AttributeError):
            failed = []
        return "; ".join(failed) or f"{health.get('models')} (see /info or the server log)"


def _retryable_503(response) -> bool:
    """A 503 that says the server is loading or busy (not that a model failed to load)."""
    if response.status_code != 503:
        return False
    try:
        data = response.json()
    except ValueError:
        return True   # a proxy's 503: assume the backend is coming back
    return not isinstance(data, dict) or bool(data.get("retryable", True))


def _error_message(response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:500] or response.reason
    return str(data.get("error", data)) if isinstance(data, dict) else str(data)


def _json_or_error(service: str, url: str, response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as e:
        raise ServiceError(service, url, f"answer is not JSON: {response.text[:200]!r}",
                           response.status_code) from e
    if not isinstance(data, dict):
        raise ServiceError(service, url, f"answer is not a JSON object: {data!r}")
    return data


class RemoteTextEncoder(_RemoteService):
    """``encode(prompts) -> TextEmbeddings`` through ``POST /caption-api``."""

    service = "caption"
    endpoint = "/caption-api"

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, **kwargs):
        super().__init__(url, token, timeout, **kwargs)

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        try:
            for i, p in enumerate(prompts):
                check_text(p, f"prompt {i}")
            body = CaptionRequest(tuple(prompts)).to_bytes()
        except (ProtocolError, UnicodeError) as e:
            raise ServiceError(self.service, self.url, f"cannot send the prompts: {e}") from e
        answer = self._parse(CaptionResponse.from_bytes, self._post(body))
        try:
            answer.check_shapes(batch=len(prompts))
        except ProtocolError as e:
            raise ServiceError(self.service, self.url, f"bad answer from the server: {e}") from e
        return TextEmbeddings(answer.y, answer.y_mask, answer.clip_embedding)


class RemoteVAE(_RemoteService):
    """``decode(latents)`` -> float video (B, F, 3, H, W) in the server VAE's dtype;
    ``decode_uint8(latents)`` -> (B, F, H, W, 3) uint8 frames (half or a quarter of the bytes)."""

    service = "vae"
    endpoint = "/vae-api"

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents, "float")

    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents, "uint8")

    def _decode(self, latents: torch.Tensor, output: str) -> torch.Tensor:
        """A batch over the service's default limits (MAX_VAE_BATCH, MAX_LATENT_ELEMENTS) is sent
        as several requests; the server still answers 422 for a single sample over its limit."""
        per_sample = latents[0].numel() if latents.dim() == 5 and len(latents) else 1
        group = max(1, min(MAX_VAE_BATCH, MAX_LATENT_ELEMENTS // max(per_sample, 1)))
        if latents.dim() != 5 or len(latents) <= group:
            return self._decode_one(latents, output)
        return torch.cat([self._decode_one(part, output) for part in latents.split(group)])

    def _decode_one(self, latents: torch.Tensor, output: str) -> torch.Tensor:
        body = VAERequest(latents, output).to_bytes()
        answer = self._parse(VAEResponse.from_bytes, self._post(body))
        try:
            answer.check(tuple(latents.shape), output)
        except ProtocolError as e:
            raise ServiceError(self.service, self.url, f"bad answer from the server: {e}") from e
        return answer.video
