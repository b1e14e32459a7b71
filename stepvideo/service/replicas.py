"""Several caption/VAE service replicas behind one client: ``--caption_url a:8080,b:8080``.

``text_encoder(urls)`` and ``vae(urls)`` return the plain ``RemoteTextEncoder`` / ``RemoteVAE`` for
one address and a :class:`Replicated` client for a comma-separated list. The replicated client
wraps one plain client per replica (each making a single attempt per call) and:

- spreads calls round-robin over the replicas, healthy ones first: a replica that just failed is
  tried last for ``cooldown`` seconds;
- fails over to the next replica when one is unreachable, times out or answers 5xx (503: loading,
  busy or a model that failed to load there; 500: a model error there). A 4xx is the request's
  fault and is raised at once: another replica would refuse it too;
- when every replica failed, waits (the ``RetryPolicy`` backoff) and goes round again until the
  policy's ``max_wait`` is spent, then raises one ``ServiceError`` naming every replica tried and
  what each answered.

Same interface as the plain clients (``encode`` / ``decode`` / ``decode_uint8``, ``health``,
``wait_ready``, ``url``), so the pipeline and the runner take either.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .client import RemoteTextEncoder, RemoteVAE, RetryPolicy, ServiceError, _RemoteService

SINGLE_ATTEMPT = RetryPolicy(max_wait=0.0)


def split_urls(urls: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a:1, b:2"`` or a list -> ``["a:1", "b:2"]``; ValueError for an empty entry."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    items = [u.strip() for u in items]
    if not items or any(not u for u in items):
        raise ValueError(f"bad service address list {urls!r}: use host[:port] or URLs separated "
                         "by commas, with no empty entry")
    return items


def failover(e: ServiceError) -> bool:
    """Another replica may answer: unreachable / timed out (no status) or a server-side 5xx."""
    return e.status is None or e.status >= 500


class Replicated:
    """One service spread over replicas; see the module docstring."""

    def __init__(self, clients: list[_RemoteService], retry: RetryPolicy = RetryPolicy(),
                 cooldown: float = 30.0):
        if not clients:
            raise ValueError("no replicas")
        self.clients, self.retry, self.cooldown = list(clients), retry, cooldown
        self.service = clients[0].service
        self._next = 0
        self._failed_at: dict[int, float] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return ",".join(c.url for c in self.clients)

    @property
    def base_url(self) -> str:
        return ",".join(c.base_url for c in self.clients)

    def order(self) -> list[int]:
        """Round-robin start; replicas that failed within ``cooldown`` seconds go last."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.clients)
            now = time.monotonic()
            ring = [(start + i) % len(self.clients) for i in range(len(self.clients))]
            recent = {i for i, t in self._failed_at.items() if now - t < self.cooldown}
        return [i for i in ring if i not in recent] + [i for i in ring if i in recent]

    def call(self, fn: Callable[[_RemoteService], Any]) -> Any:
        """``fn(client)`` on one replica after another until one answers (see the module)."""
        delays = self.retry.delays()
        start, tried = time.monotonic(), {}
        while True:
            for i in self.order():
                client = self.clients[i]
                try:
                    result = fn(client)
                except ServiceError as e:
                    if not failover(e):
                        raise
                    tried[client.base_url] = e.server_message if e.status is None else \
                        f"HTTP {e.status}: {e.server_message}"
                    with self._lock:
                        self._failed_at[i] = time.monotonic()
                    continue
                with self._lock:
                    self._failed_at.pop(i, None)
                return result
            delay = next(delays, None)
            if delay is None:
                raise ServiceError(
                    self.service, self.url, f"all {len(self.clients)} replicas failed over "
                    f"{time.monotonic() - start:.1f} s: " + "; ".join(
                        f"{url}: {why}" for url, why in tried.items()))
            time.sleep(delay)

    def health(self, retry: bool = False) -> dict[str, Any]:
        """``ready`` when any replica is; ``replicas`` maps each address to its /health (or
        error). ServiceError naming each replica when none answers at all (as the plain client
        raises for its one address)."""
        replicas: dict[str, Any] = {}
        for c in self.clients:
            try:
                health = c.health(retry=retry)
                replicas[c.base_url] = {"status": "unavailable", **health}  # e.g. a proxy's 503
            except ServiceError as e:
                replicas[c.base_url] = {"status": "unreachable", "error": str(e)}
        states = [h.get("status") for h in replicas.values()]
        if all(st == "unreachable" for st in states):
            raise ServiceError(self.service, self.url, "no replica answers: " + "; ".join(
                f"{u}: {h['error']}" for u, h in replicas.items()))
        status = next((s for s in ("ready", "loading", "failed") if s in states), "unreachable")
        return {"status": status, "replicas": replicas}

    def wait_ready(self, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Until at least one replica is ready; ServiceError naming every replica otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                health = self.health()
            except ServiceError as e:  # none reachable yet: they may be starting
                health = {"status": "unreachable", "replicas": {}, "error": e.server_message}
            if health["status"] == "ready":
                return health
            states = [h.get("status") for h in health["replicas"].values()]
            if time.monotonic() >= deadline or (states and all(st == "failed" for st in states)):
                raise ServiceError(self.service, self.url, f"no replica ready after {timeout} s: "
                                   + (health.get("error") or "; ".join(
                                       f"{u}: {h.get('error') or h.get('status')}"
                                       for u, h in health["replicas"].items())))
            time.sleep(poll)


class ReplicatedTextEncoder(Replicated):
    def encode(self, prompts):
        return self.call(lambda c: c.encode(prompts))


class ReplicatedVAE(Replicated):
    def decode(self, latents):
        return self.call(lambda c: c.decode(latents))

    def decode_uint8(self, latents):
        return self.call(lambda c: c.decode_uint8(latents))


def text_encoder(urls: str | list[str], token: str | None = None, **kwargs):
    """``RemoteTextEncoder`` for one address, ``ReplicatedTextEncoder`` for several."""
    return _client(urls, RemoteTextEncoder, ReplicatedTextEncoder, token, kwargs)


def vae(urls: str | list[str], token: str | None = None, **kwargs):
    """``RemoteVAE`` for one address, ``ReplicatedVAE`` for several."""
    return _client(urls, RemoteVAE, ReplicatedVAE, token, kwargs)


def _client(urls, single, replicated, token, kwargs):
    items = split_urls(urls)
    if len(items) == 1:
        return single(items[0], token=token, **kwargs)
    retry = kwargs.pop("retry", RetryPolicy())
    cooldown = kwargs.pop("cooldown", 30.0)
    return replicated([single(u, token=token, retry=SINGLE_ATTEMPT, **kwargs) for u in items],
                      retry=retry, cooldown=cooldown)
