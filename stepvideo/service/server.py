"""The caption/VAE service: a Flask app over the in-process backends, served by waitress.

Endpoints (bodies are :mod:`stepvideo.service.protocol` messages, errors are JSON):

* ``POST /caption-api``  caption_request (prompts) -> caption_response (y, y_mask, clip_embedding)
* ``POST /vae-api``      vae_request (latents, output "float" | "uint8") -> vae_response (video)
* ``GET /health``        200 ``{"status": "ready"}`` or 503 with "loading" / "failed"; only the
  states (no paths or error messages: it needs no token), never blocks
* ``GET /info``          model dirs, dtypes, devices, versions, limits, cache and request counters,
  and why a model failed

Statuses: 400 malformed body, 401 missing or wrong token, 413 body over the limit, 415 wrong
Content-Type, 422 shapes, dtypes or sizes that do not fit the models, 503 not loaded yet or the
model's queue is full (retry), 500 a failure inside a model (the message says which and what).
A CUDA error inside a model (device-side assert, illegal address: the CUDA context is unusable
afterwards) also marks that model "failed", so /health stops saying ready; out of memory does not.

Each model has its own first-come-first-served line, so a caption request never waits for a VAE
decode; a bounded number of requests may wait per model, each for at most ``max_wait`` seconds
(the rest get a retryable 503): waitress always keeps threads for ``/health``. Bodies are checked
from their header before anything is decoded or queued, and a VAE request's cost is bounded by
frames, side and pixels per frame (``AppLimits``). Sockets are guarded by
:mod:`stepvideo.service.guard` (header/request deadlines, per-address connection budget, send
timeout). Models load in a background thread after the socket is bound, so ``/health`` answers
"loading" at once. Binding anything but a loopback address needs a token of printable ASCII.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hmac
import ipaddress
import logging
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..layout import HUNYUAN_CLIP, STEP_LLM, VAE
from .guard import ConnectionLimits, create_guarded_server
from .protocol import (ACCEPTED_CONTENT_TYPES, CONTENT_TYPE, DEFAULT_PORT, MAX_LATENT_ELEMENTS,
                       MAX_VAE_BATCH, MAX_VIDEO_AREA, MAX_VIDEO_FRAMES, MAX_VIDEO_SIDE, PROTOCOL,
                       TOKEN_ENV, CaptionLimits, CaptionRequest, CaptionResponse, ErrorBody,
                       ProtocolError, VAELimits, VAERequest, VAEResponse, short)

logger = logging.getLogger("stepvideo.service")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY = 256 << 20          # 256 MiB: latents of 204 frames at 544x992 are ~10 MB
DEFAULT_THREADS = 16
DEFAULT_MAX_WAIT = 60.0               # seconds a request may wait in a model's line
HEALTH_HINT = "see /info or the server log"


class ServiceUnavailable(Exception):
    """503: the model is not loaded yet or its queue is full (``retryable``: the client retries),
    or it failed to load or is not hosted here (not retryable)."""

    status = 503

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class ModelFailure(Exception):
    """500: the model raised while serving a request."""

    status = 500


def is_cuda_error(e: BaseException) -> bool:
    """An error after which the CUDA context is unusable (device-side assert, illegal memory
    access), so every later call fails too. Out of memory is not one: the next request may fit."""
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(e):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and "CUDA" in str(e)


# --------------------------------------------------------------------------------------------
# Hosted models
# --------------------------------------------------------------------------------------------

class ModelSlot:
    """One hosted model: its load state and a bounded first-come-first-served line.

    At most ``max_pending`` requests are in the line (the one running included); the rest get a
    retryable 503 at once, and one that waits longer than ``max_wait`` seconds gets one too.
    Python's locks are not fair, so the line is a deque of tickets under a condition variable."""

    def __init__(self, name: str, max_pending: int, max_wait: float = DEFAULT_MAX_WAIT):
        self.name, self.max_pending, self.max_wait = name, max_pending, max_wait
        self.state, self.detail, self.model = "absent", "not configured on this server", None
        self._turn = threading.Condition()
        self._line: collections.deque[object] = collections.deque()
        self._running = False
        self.served = self.failed = self.timed_out = 0

    @property
    def pending(self) -> int:
        return len(self._line) + self._running

    def set_state(self, state: str, detail: str, model: Any = None) -> None:
        self.model, self.state, self.detail = model, state, detail

    def ready_model(self) -> Any:
        if self.state != "ready":
            raise ServiceUnavailable(f"{self.name} model is {self.state}: {self.detail}",
                                     retryable=self.state == "loading")
        return self.model

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        """Wait for this request's turn (if the line is not full) and run it on the model."""
        self.ready_model()
        self._wait_turn()
        try:
            yield self.ready_model()     # it may have failed while this request waited
        finally:
            with self._turn:
                self._running = False
                self._turn.notify_all()

    def _wait_turn(self) -> None:
        ticket = object()
        with self._turn:
            if self.pending >= self.max_pending:
                raise ServiceUnavailable(f"{self.name} model is busy: {self.pending} requests "
                                         "are already in line; retry later")
            self._line.append(ticket)
            deadline = time.monotonic() + self.max_wait
            try:
                while self._running or self._line[0] is not ticket:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.timed_out += 1
                        raise ServiceUnavailable(f"{self.name} model is busy: waited "
                                                 f"{self.max_wait:g} s in line; retry later")
                    self._turn.wait(left)
            except BaseException:
                self._line.remove(ticket)       # never leave a dead ticket at the head
                self._turn.notify_all()
                raise
            self._line.popleft()
            self._running = True

    def run(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(model)`` in this request's turn; a model exception becomes a ModelFailure (500)."""
        with self.use() as model:
            try:
                out = fn(model)
            except (ProtocolError, ServiceUnavailable):
                raise
            except Exception as e:  # noqa: BLE001 - any model error is answered as a 500
                self.failed += 1
                logger.exception("%s model failed", self.name)
                if is_cuda_error(e):
                    self.set_state("failed", f"CUDA error while serving a request "
                                             f"({type(e).__name__}: {e}); restart the server")
                    logger.error("%s model marked failed after a CUDA error; restart the server",
                                 self.name)
                raise ModelFailure(f"{self.name} model failed: {type(e).__name__}: {e}") from e
            self.served += 1
            return out

    def summary(self) -> dict[str, Any]:
        return {"status": self.state, "detail": self.detail, "queued": self.pending,
                "served": self.served, "failed": self.failed, "timed_out_in_line": self.timed_out}


class ServiceModels:
    """The caption and VAE backends of a server (a :class:`LocalTextEncoder`, a :class:`LocalVAE`)
    plus the facts /info reports about them."""

    def __init__(self, caption: Any = None, vae: Any = None, max_pending: int = 6,
                 info: dict[str, dict[str, Any]] | None = None,
                 max_wait: float = DEFAULT_MAX_WAIT):
        self.caption = ModelSlot("caption", max_pending, max_wait)
        self.vae = ModelSlot("vae", max_pending, max_wait)
        self.info = {"caption": {}, "vae": {}, **(info or {})}
        for slot, model in ((self.caption, caption), (self.vae, vae)):
            if model is not None:
                slot.set_state("ready", "loaded", model)

    def load_in_background(self, load_caption: Callable[[], Any] | None,
                           load_vae: Callable[[], Any] | None) -> threading.Thread:
        """Mark the given slots "loading" and load them one after the other in a daemon thread."""
        jobs = [(s, f) for s, f in ((self.caption, load_caption), (self.vae, load_vae)) if f]
        for slot, _ in jobs:
            slot.set_state("loading", "weights are being loaded")
        thread = threading.Thread(target=self._load, args=(jobs,), name="model-loader",
                                  daemon=True)
        thread.start()
        return thread

    def _load(self, jobs) -> None:
        for slot, load in jobs:
            start = time.monotonic()
            try:
                model = load()
            except Exception as e:  # noqa: BLE001 - reported by /health and every request
                logger.exception("loading the %s model failed", slot.name)
                slot.set_state("failed", f"loading failed: {type(e).__name__}: {e}")
                continue
            slot.set_state("ready", f"loaded in {time.monotonic() - start:.1f} s", model)
            logger.info("%s model ready (%.1f s)", slot.name, time.monotonic() - start)

    def health(self) -> dict[str, Any]:
        """The states only: /health needs no token, so no paths or error messages (see /info)."""
        slots = [s for s in (self.caption, self.vae) if s.state != "absent"]
        states = {s.state for s in slots}
        status = ("failed" if "failed" in states else "loading" if "loading" in states
                  else "ready" if slots else "failed")
        out = {"status": status, "models": {s.name: s.state for s in (self.caption, self.vae)}}
        return out if status == "ready" else {**out, "hint": HEALTH_HINT}


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AppLimits:
    """What one request may ask for. The defaults are the CLI's, so an app built in-process
    (``create_app(models)``) has the same caps as ``stepvideo-server``."""

    max_body: int = DEFAULT_MAX_BODY
    caption: CaptionLimits = field(default_factory=CaptionLimits)
    max_latent_elements: int = MAX_LATENT_ELEMENTS
    max_vae_batch: int = MAX_VAE_BATCH
    max_video_frames: int = MAX_VIDEO_FRAMES
    max_video_side: int = MAX_VIDEO_SIDE
    max_video_area: int = MAX_VIDEO_AREA

    def vae(self, z_channels: int) -> VAELimits:
        return VAELimits(z_channels=z_channels, max_latent_elements=self.max_latent_elements,
                         max_batch=self.max_vae_batch, max_frames=self.max_video_frames,
                         max_side=self.max_video_side, max_area=self.max_video_area)

    def to_json(self) -> dict[str, int]:
        return {"max_body": self.max_body, "max_batch": self.caption.max_batch,
                "max_prompt_chars": self.caption.max_prompt_chars,
                "max_latent_elements": self.max_latent_elements,
                "max_vae_batch": self.max_vae_batch, "max_video_frames": self.max_video_frames,
                "max_video_side": self.max_video_side, "max_video_area": self.max_video_area}


def create_app(models: ServiceModels, token: str | None = None,
               max_body: int = DEFAULT_MAX_BODY, limits: AppLimits | None = None,
               connections: ConnectionLimits | None = None):
    """The Flask app. ``token`` (if set) is required on every endpoint but /health;
    ``connections`` is only reported by /info (the server enforces it)."""
    from flask import Flask

    token = check_token(token)
    limits = limits or AppLimits(max_body=max_body)
    app = Flask("stepvideo.service")
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body
    app.before_request(auth_check(token))
    _register_errors(app)
    _register_api(app, models, limits)
    _register_status(app, models, limits, token, connections)
    return app


def json_error(status: int, message: str, service: str = "", headers: dict | None = None,
                **extra: Any):
    from flask import jsonify

    response = jsonify(ErrorBody(message, status, service, extra).to_json())
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _service_of(path: str) -> str:
    return {"/caption-api": "caption", "/vae-api": "vae"}.get(path, "")


def auth_check(token: str | None):
    from flask import request

    expected = token.encode("ascii") if token else None

    def check():
        if expected is None or request.path == "/health":
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), expected):
            return None
        return json_error(401, f"missing or wrong token: send 'Authorization: Bearer <token>' "
                                f"(the client reads {TOKEN_ENV})", _service_of(request.path),
                           {"WWW-Authenticate": "Bearer"})

    return check


def _register_errors(app) -> None:
    from flask import request
    from werkzeug.exceptions import HTTPException

    @app.errorhandler(ProtocolError)
    def protocol_error(e: ProtocolError):
        return json_error(e.status, str(e), _service_of(request.path))

    @app.errorhandler(ServiceUnavailable)
    def unavailable(e: ServiceUnavailable):
        headers = {"Retry-After": "1"} if e.retryable else {}
        return json_error(503, str(e), _service_of(request.path), headers,
                           retryable=e.retryable)

    @app.errorhandler(ModelFailure)
    def model_failure(e: ModelFailure):
        return json_error(500, str(e), _service_of(request.path))

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        message = e.description or e.name
        if e.code == 413:
            message = (f"request body is larger than this server's limit of "
                       f"{app.config['MAX_CONTENT_LENGTH']} bytes (--max_body_mb); "
                       "send fewer prompts or a smaller latent batch")
        return json_error(e.code or 500, message, _service_of(request.path))

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        logger.exception("unexpected error in %s", request.path)
        return json_error(500, f"internal error: {type(e).__name__}: {str(e)[:200]}",
                           _service_of(request.path))


def _request_body() -> bytes:
    from flask import request

    if request.mimetype not in ACCEPTED_CONTENT_TYPES:
        raise _UnsupportedMediaType(f"Content-Type {short(request.mimetype or '(none)')} is not "
                                    f"accepted; send {CONTENT_TYPE} (a safetensors message)")
    return request.get_data(cache=False)


class _UnsupportedMediaType(ProtocolError):
    status = 415


def _binary(body: bytes):
    from flask import Response

    return Response(body, status=200, mimetype=CONTENT_TYPE)


def _register_api(app, models: ServiceModels, limits: AppLimits) -> None:
    @app.post("/caption-api")
    def caption_api():
        req = CaptionRequest.from_bytes(_request_body())
        req.validate(limits.caption)
        emb = models.caption.run(lambda encoder: encoder.encode(list(req.prompts)))
        return _binary(CaptionResponse(emb.y, emb.mask, emb.clip).to_bytes())

    @app.post("/vae-api")
    def vae_api():
        req = VAERequest.from_bytes(_request_body())
        vae = models.vae.ready_model()
        req.validate(limits.vae(vae.z_channels))
        decode = (lambda v: v.decode_uint8(req.latents)) if req.output == "uint8" else \
            (lambda v: v.decode(req.latents))
        return _binary(VAEResponse(models.vae.run(decode), req.output).to_bytes())


def _register_status(app, models: ServiceModels, limits: AppLimits, token: str | None,
                     connections: ConnectionLimits | None) -> None:
    from flask import jsonify

    @app.get("/health")
    def health():
        body = models.health()
        response = jsonify({**body, "retryable": body["status"] == "loading"})
        response.status_code = 200 if body["status"] == "ready" else 503
        return response

    @app.get("/info")
    def info():
        return jsonify(_info(models, limits, token, connections))


def _info(models: ServiceModels, limits: AppLimits, token: str | None,
          connections: ConnectionLimits | None) -> dict[str, Any]:
    from .. import __version__

    caption = {**models.info["caption"], **models.caption.summary()}
    vae = {**models.info["vae"], **models.vae.summary()}
    if models.caption.state == "ready":
        encoder = models.caption.model
        caption["cache"] = encoder.cache_info()
        caption["llm_max_length"], caption["clip_max_length"] = encoder.max_lengths
    if models.vae.state == "ready":
        vae["z_channels"] = models.vae.model.z_channels
    return {
        "protocol": PROTOCOL,
        "health": models.health(),
        "models": {"caption": caption, "vae": vae},
        "limits": {**limits.to_json(), "max_queued_per_model": models.caption.max_pending,
                   "max_wait_in_line": models.caption.max_wait},
        "connections": asdict(connections) if connections else "not served by stepvideo-server",
        "auth": "bearer token" if token else "none (loopback only)",
        "versions": {"stepvideo": __version__, "torch": torch.__version__,
                     "python": platform.python_version(), "flask": _version("flask"),
                     "waitress": _version("waitress")},
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServiceConfigError(ValueError):
    """The server was asked to start in an unsafe or impossible configuration."""


def check_token(token: str | None) -> str | None:
    """The token stripped of surrounding whitespace; None for none or whitespace only. A token
    must be printable ASCII without spaces (it travels in an HTTP header as ``Bearer <token>``)."""
    if token is None or not token.strip():
        return None
    token = token.strip()
    bad = [i for i, c in enumerate(token) if not "!" <= c <= "~"]
    if bad:
        raise ServiceConfigError(f"the token has a character that is not printable ASCII "
                                 f"(or is a space) at position {bad[0]} of {len(token)}; use "
                                 f"letters, digits and punctuation, e.g. the output of "
                                 f"'python -c \"import secrets; print(secrets.token_urlsafe())\"'")
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token (whitespace is no token)."""
    if not is_loopback(host) and not check_token(token):
        raise ServiceConfigError(
            f"refusing to listen on {host} without a token: anyone who can reach that address "
            f"could use this server. Set {TOKEN_ENV} or pass --token_file PATH (clients send the "
            f"token as 'Authorization: Bearer SECRET' and read the same variable), or bind "
            f"127.0.0.1.")


def create_server(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                  threads: int = DEFAULT_THREADS, max_body: int = DEFAULT_MAX_BODY,
                  connections: ConnectionLimits | None = None):
    """A bound (not yet running) waitress server for ``app`` with the socket guards of
    :mod:`stepvideo.service.guard`; call ``.run()``. ServiceConfigError if the address is taken.

    waitress itself rejects bodies over twice ``max_body`` (with its own plain-text 413) so that it
    never buffers more than that; bodies between the two limits get the app's JSON 413."""
    if threads < 4:
        raise ServiceConfigError(f"threads must be >= 4 so /health never waits, got {threads}")
    try:
        return create_guarded_server(app, host, port, threads, connections or ConnectionLimits(),
                                     ident="stepvideo",
                                     max_request_body_size=2 * max_body + (1 << 20))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ServiceConfigError(f"port {port} on {host} is already in use (another "
                                     f"stepvideo-server?); stop it or pass --port") from e
        raise ServiceConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    except ValueError as e:
        raise ServiceConfigError(str(e)) from e


@dataclass(frozen=True)
class ServerOptions:
    """What ``api/call_remote_server.py`` parses. Part directories relative to ``model_dir``
    (the release's convention) or absolute."""

    model_dir: str
    llm_dir: str = STEP_LLM.folder
    clip_dir: str = HUNYUAN_CLIP.folder
    vae_dir: str = VAE.folder
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    device: str = "auto"
    dtype: str = "bfloat16"
    token: str | None = None
    token_file: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    threads: int = DEFAULT_THREADS
    cache_size: int = 64
    max_latent_elements: int = MAX_LATENT_ELEMENTS
    max_video_frames: int = MAX_VIDEO_FRAMES
    max_video_side: int = MAX_VIDEO_SIDE
    max_video_area: int = MAX_VIDEO_AREA
    max_wait: float = DEFAULT_MAX_WAIT
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    vae_tile: str = "auto"          # spatial tiles of the VAE decode: auto, off or N (latent px)
    devices: tuple[str, ...] = ()   # further VAE replicas: chunks decoded on all at once

    def resolved_token(self) -> str | None:
        """``token``, else the stripped contents of ``token_file``, else $STEPVIDEO_API_TOKEN;
        whitespace only counts as none, anything but printable ASCII is a ServiceConfigError."""
        if self.token is not None:
            return check_token(self.token)
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ServiceConfigError(f"cannot read --token_file {self.token_file}: {e}") from e
            if not token:
                raise ServiceConfigError(f"--token_file {self.token_file} is empty")
            return check_token(token)
        return check_token(os.environ.get(TOKEN_ENV))

    def torch_dtype(self) -> torch.dtype:
        from ..devices import resolve_dtype

        try:
            return resolve_dtype(self.dtype, self.torch_device())
        except ValueError as e:
            raise ServiceConfigError(f"--dtype: {e}") from e

    def torch_device(self) -> str:
        from ..devices import resolve_device

        try:
            return str(resolve_device(self.device))
        except ValueError as e:
            raise ServiceConfigError(f"--device: {e}") from e


def build_service(opts: ServerOptions) -> tuple[Any, ServiceModels, Callable[[], threading.Thread]]:
    """Check the configuration and the model files; return (app, models, start_loading)."""
    from ..layout import check_model_dir
    from ..text_encoder.local import LocalTextEncoder
    from ..vae.local import LocalVAE

    token = opts.resolved_token()
    check_bind(opts.host, token)
    limits = AppLimits(opts.max_body, CaptionLimits(), opts.max_latent_elements,
                       max_video_frames=opts.max_video_frames,
                       max_video_side=opts.max_video_side, max_video_area=opts.max_video_area)
    try:
        limits.vae(1)
    except ValueError as e:
        raise ServiceConfigError(f"bad VAE limit: {e} (--max_latent_elements, "
                                 "--max_video_frames, --max_video_side, --max_video_area)") from e
    dtype, device = opts.torch_dtype(), opts.torch_device()
    llm, clip, vae = STEP_LLM.folder, HUNYUAN_CLIP.folder, VAE.folder
    dirs = check_model_dir(opts.model_dir, (llm, clip, vae),
                           {llm: opts.llm_dir, clip: opts.clip_dir, vae: opts.vae_dir})
    info = {"caption": {"llm_dir": dirs[llm], "clip_dir": dirs[clip],
                        "dtype": str(dtype).replace("torch.", ""), "clip_dtype": "float32",
                        "device": device},
            "vae": {"vae_dir": dirs[vae], "dtype": str(dtype).replace("torch.", ""),
                    "device": device}}
    models = ServiceModels(max_pending=max(1, (opts.threads - 4) // 2), info=info,
                           max_wait=opts.max_wait)
    app = create_app(models, token, limits=limits, connections=opts.connections)

    def start_loading() -> threading.Thread:
        return models.load_in_background(
            lambda: LocalTextEncoder.from_dirs(dirs[llm], dirs[clip], dtype,
                                               device, cache_size=opts.cache_size),
            lambda: LocalVAE.from_dir(dirs[vae], dtype, device, tile=opts.vae_tile,
                                      devices=opts.devices))

    return app, models, start_loading


def run_server(opts: ServerOptions) -> None:
    """Check, bind, load in the background, serve. Raises ServiceConfigError / CheckpointError
    before binding when the configuration or the model directory is wrong."""
    app, _, start_loading = build_service(opts)
    server = create_server(app, opts.host, opts.port, opts.threads, opts.max_body,
                           opts.connections)
    logger.info("stepvideo service listening on http://%s:%d (%d threads); loading models",
                opts.host, opts.port, opts.threads)
    start_loading()
    server.run()
