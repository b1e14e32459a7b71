"""waitress with deadlines and connection budgets: what keeps slow or hostile clients from
holding the service's sockets and worker threads.

waitress reads requests on its event loop (no thread per connection) and runs the app on a fixed
pool of threads. Out of the box it has three availability holes that this module closes:

* no deadline for finishing a request: ``channel_timeout`` counts inactivity, so a client that
  dribbles a header line a second keeps its connection forever, and 100 such clients
  (``connection_limit``) lock everyone out. Here a request's headers must arrive within
  ``header_timeout`` seconds of its first byte and the whole request within ``request_timeout``;
* one address may hold at most ``max_connections_per_ip`` connections (the rest get a 503 and are
  closed), so one client cannot spend the whole ``max_connections`` budget alone;
* a worker writing an answer waits, without a deadline, while more than ``max_unsent`` bytes sit
  unsent (``outbuf_high_watermark``); a client that never reads parks that worker for as long as
  it keeps the socket open. Here a connection whose answer makes no progress for
  ``send_timeout`` seconds is closed, which wakes the worker.

Why waitress and not another server: its event loop already makes a slow connection cost a file
descriptor, not a thread, so only the missing deadlines and budgets had to be added (about 100
lines). gunicorn's sync and gthread workers hold a worker (or a thread) per connection and its docs
send slow clients to a buffering proxy; its fork model would also load the models once per worker.
cheroot's and uvicorn's documented timeouts bound single reads or keep-alive, not a whole header, so
a dribbler still wins; tornado has a header deadline but would replace the WSGI stack the tests and
``/info`` rely on.

The checks run in waitress' maintenance pass (every ``cleanup_interval`` = 1 s) on its event-loop
thread; the closes themselves run through waitress' trigger, outside the select() bookkeeping.
They rely on waitress 3 internals (the channel's ``request``, ``requests``, ``total_outbufs_len``,
``last_activity``, the server's ``trigger``); tests/test_service_hardening.py exercises each check
against a real server, so a waitress that changes them fails there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

logger = logging.getLogger("stepvideo.service")

_BUSY_JSON = (b'{"error": "too many connections from this address; retry later", "status": 503, '
              b'"service": "", "retryable": true}')
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
               b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
               % (len(_BUSY_JSON), _BUSY_JSON))


@dataclass(frozen=True)
class ConnectionLimits:
    """Socket-level limits of the server (seconds, counts, bytes)."""

    max_connections: int = 500           # open connections in all (waitress connection_limit)
    max_connections_per_ip: int = 100    # per client address; 0 = no per-address budget
    header_timeout: float = 10.0         # first byte of a request -> end of its headers
    request_timeout: float = 120.0       # first byte -> end of its body (256 MiB at ~2 MiB/s)
    send_timeout: float = 30.0           # an unsent answer may make no progress this long
    idle_timeout: float = 60.0           # keep-alive connection with nothing in flight
    max_unsent: int = 16 << 20           # bytes of an answer buffered before the worker waits

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value < (0 if name == "max_connections_per_ip" else 1):
                raise ValueError(f"{name} must be >= 1, got {value}")

    def waitress_options(self) -> dict[str, Any]:
        return {"connection_limit": self.max_connections, "cleanup_interval": 1,
                "channel_timeout": int(self.idle_timeout),
                "outbuf_high_watermark": self.max_unsent}


def ensure_file_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``needed`` if the hard limit allows; ValueError if not.
    (Windows has no such limit to raise.)"""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(f"{needed} file descriptors are needed but the hard limit is {hard} "
                             "(ulimit -Hn); lower --max_connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class GuardedChannel(HTTPChannel):
    """An HTTP channel that remembers when it last sent bytes and enforces the per-address
    budget on arrival."""

    last_sent = 0.0

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        limit = server.limits.max_connections_per_ip
        host = addr[0] if isinstance(addr, tuple) and addr else None
        if limit and host is not None:
            same = sum(1 for ch in list(server.active_channels.values())
                       if isinstance(ch.addr, tuple) and ch.addr and ch.addr[0] == host)
            if same > limit:
                self._refuse(f"{host} already holds {same - 1} connections "
                             f"(--max_connections_per_ip {limit})")

    def _refuse(self, why: str) -> None:
        logger.warning("refusing a connection: %s", why)
        with self.outbuf_lock:
            self.outbufs[-1].append(BUSY_ANSWER)
            self.current_outbuf_count += len(BUSY_ANSWER)
            self.total_outbufs_len += len(BUSY_ANSWER)
        self.close_when_flushed = True

    def send(self, data, do_close=True):
        sent = super().send(data, do_close)
        if sent:
            self.last_sent = time.time()
        return sent


class GuardedServer(TcpWSGIServer):
    """waitress' TCP server with :class:`ConnectionLimits` enforced in its maintenance pass."""

    channel_class = GuardedChannel

    def __init__(self, application, limits: ConnectionLimits, *args, **kwargs):
        self.limits = limits
        self._seen: dict[int, tuple] = {}
        super().__init__(application, *args, **kwargs)

    def maintenance(self, now: float) -> None:
        seen = {}
        for fd, ch in list(self.active_channels.items()):
            request, pending = ch.request, ch.total_outbufs_len
            old = self._seen.get(fd)
            if old is None or old[0] is not ch:
                old = (ch, None, now, now)
            _, old_request, request_since, unsent_since = old
            if request is not old_request:
                request_since = now
            if not pending:
                unsent_since = now
            seen[fd] = (ch, request, request_since, unsent_since)
            why = self._overdue(ch, now, request, request_since, pending,
                                max(unsent_since, ch.last_sent))
            if why:
                logger.warning("closing the connection from %s: %s", _host(ch), why)
                # Not here: maintenance runs while the event loop builds its select() lists.
                self.trigger.pull_trigger(_closer(ch))
                seen.pop(fd, None)
        self._seen = seen

    def _overdue(self, ch, now, request, request_since, pending, progress) -> str | None:
        lim = self.limits
        if request is not None and not request.headers_finished \
                and now - request_since > lim.header_timeout:
            return f"request headers not complete within {lim.header_timeout:g} s"
        if request is not None and now - request_since > lim.request_timeout:
            return f"request not complete within {lim.request_timeout:g} s"
        if pending and now - progress > lim.send_timeout:
            return f"the client read none of its answer for {lim.send_timeout:g} s"
        if request is None and not ch.requests and not pending \
                and now - ch.last_activity > lim.idle_timeout:
            return f"idle for {lim.idle_timeout:g} s"
        return None


def _closer(ch):
    def close():
        if ch.socket is not None:
            ch.handle_close()
    return close


def _host(ch) -> str:
    return str(ch.addr[0]) if isinstance(ch.addr, tuple) and ch.addr else "?"


def create_guarded_server(app, host: str, port: int, threads: int, limits: ConnectionLimits,
                          **waitress_options: Any) -> GuardedServer:
    """A bound, not yet running server (``.run()``); OSError if the address cannot be bound."""
    from waitress.adjustments import Adjustments
    from waitress.task import ThreadedTaskDispatcher

    ensure_file_limit(limits.max_connections + 2 * threads + 64)
    adj = Adjustments(host=host, port=port, threads=threads,
                      **limits.waitress_options(), **waitress_options)
    if len(adj.listen) != 1:
        raise ValueError(f"{host}:{port} resolves to {len(adj.listen)} addresses; bind one")
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    return GuardedServer(app, limits, {}, True, None, dispatcher=dispatcher, adj=adj,
                         sockinfo=adj.listen[0])
