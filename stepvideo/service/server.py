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

Each model has its own lock, so a caption request never waits for a VAE decode, and a bounded
number of requests may wait per model (the rest get 503 and retry): waitress always keeps threads
for ``/health``. Models load in a background thread after the socket is bound, so ``/health``
answers "loading" at once. Binding anything but a loopback address needs a token.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .protocol import (ACCEPTED_CONTENT_TYPES, CONTENT_TYPE, DEFAULT_PORT, MAX_LATENT_ELEMENTS,
                       MAX_VAE_BATCH, PROTOCOL, TOKEN_ENV, CaptionLimits, CaptionRequest,
                       CaptionResponse, ErrorBody, ProtocolError, VAELimits, VAERequest,
                       VAEResponse)

logger = logging.getLogger("stepvideo.service")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY = 256 << 20          # 256 MiB: latents of 204 frames at 544x992 are ~10 MB
DEFAULT_THREADS = 16
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
    """One hosted model: its load state, an inference lock and a bounded waiting line."""

    def __init__(self, name: str, max_pending: int):
        self.name, self.max_pending = name, max_pending
        self.state, self.detail, self.model = "absent", "not configured on this server", None
        self.lock = threading.Lock()
        self._gate = threading.Lock()
        self.pending = self.served = self.failed = 0

    def set_state(self, state: str, detail: str, model: Any = None) -> None:
        self.model, self.state, self.detail = model, state, detail

    def ready_model(self) -> Any:
        if self.state != "ready":
            raise ServiceUnavailable(f"{self.name} model is {self.state}: {self.detail}",
                                     retryable=self.state == "loading")
        return self.model

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        """Wait for the model's lock (if the line is not full) and run one request on it."""
        self.ready_model()
        with self._gate:
            if self.pending >= self.max_pending:
                raise ServiceUnavailable(f"{self.name} model is busy: {self.pending} requests "
                                         "are already queued; retry later")
            self.pending += 1
        try:
            with self.lock:
                yield self.ready_model()     # it may have failed while this request waited
        finally:
            with self._gate:
                self.pending -= 1

    def run(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(model)`` under the lock; a model exception becomes a ModelFailure (500)."""
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
                "served": self.served, "failed": self.failed}


class ServiceModels:
    """The caption and VAE backends of a server (a :class:`LocalTextEncoder`, a :class:`LocalVAE`)
    plus the facts /info reports about them."""

    def __init__(self, caption: Any = None, vae: Any = None, max_pending: int = 6,
                 info: dict[str, dict[str, Any]] | None = None):
        self.caption = ModelSlot("caption", max_pending)
        self.vae = ModelSlot("vae", max_pending)
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
    max_body: int = DEFAULT_MAX_BODY
    caption: CaptionLimits = field(default_factory=CaptionLimits)
    max_latent_elements: int = MAX_LATENT_ELEMENTS
    max_vae_batch: int = MAX_VAE_BATCH


def create_app(models: ServiceModels, token: str | None = None,
               max_body: int = DEFAULT_MAX_BODY, limits: AppLimits | None = None):
    """The Flask app. ``token`` (if set) is required on every endpoint but /health."""
    from flask import Flask

    limits = limits or AppLimits(max_body=max_body)
    app = Flask("stepvideo.service")
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body
    app.before_request(_auth_check(token))
    _register_errors(app)
    _register_api(app, models, limits)
    _register_status(app, models, limits, token)
    return app


def _json_error(status: int, message: str, service: str = "", headers: dict | None = None,
                **extra: Any):
    from flask import jsonify

    response = jsonify(ErrorBody(message, status, service, extra).to_json())
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _service_of(path: str) -> str:
    return {"/caption-api": "caption", "/vae-api": "vae"}.get(path, "")


def _auth_check(token: str | None):
    from flask import request

    expected = token.encode("utf-8") if token else None

    def check():
        if expected is None or request.path == "/health":
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"),
                                                              expected):
            return None
        return _json_error(401, f"missing or wrong token: send 'Authorization: Bearer <token>' "
                                f"(the client reads {TOKEN_ENV})", _service_of(request.path),
                           {"WWW-Authenticate": "Bearer"})

    return check


def _register_errors(app) -> None:
    from flask import request
    from werkzeug.exceptions import HTTPException

    @app.errorhandler(ProtocolError)
    def protocol_error(e: ProtocolError):
        return _json_error(e.status, str(e), _service_of(request.path))

    @app.errorhandler(ServiceUnavailable)
    def unavailable(e: ServiceUnavailable):
        headers = {"Retry-After": "1"} if e.retryable else {}
        return _json_error(503, str(e), _service_of(request.path), headers,
                           retryable=e.retryable)

    @app.errorhandler(ModelFailure)
    def model_failure(e: ModelFailure):
        return _json_error(500, str(e), _service_of(request.path))

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        message = e.description or e.name
        if e.code == 413:
            message = (f"request body is larger than this server's limit of "
                       f"{app.config['MAX_CONTENT_LENGTH']} bytes (--max_body_mb); "
                       "send fewer prompts or a smaller latent batch")
        return _json_error(e.code or 500, message, _service_of(request.path))

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        logger.exception("unexpected error in %s", request.path)
        return _json_error(500, f"internal error: {type(e).__name__}: {e}",
                           _service_of(request.path))


def _request_body() -> bytes:
    from flask import request

    if request.mimetype not in ACCEPTED_CONTENT_TYPES:
        raise _UnsupportedMediaType(f"Content-Type {request.mimetype or '(none)'!r} is not "
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
        req.validate(VAELimits(z_channels=vae.z_channels,
                               max_latent_elements=limits.max_latent_elements,
                               max_batch=limits.max_vae_batch))
        decode = (lambda v: v.decode_uint8(req.latents)) if req.output == "uint8" else \
            (lambda v: v.decode(req.latents))
        return _binary(VAEResponse(models.vae.run(decode), req.output).to_bytes())


def _register_status(app, models: ServiceModels, limits: AppLimits, token: str | None) -> None:
    from flask import jsonify

    @app.get("/health")
    def health():
        body = models.health()
        response = jsonify({**body, "retryable": body["status"] == "loading"})
        response.status_code = 200 if body["status"] == "ready" else 503
        return response

    @app.get("/info")
    def info():
        return jsonify(_info(models, limits, token))


def _info(models: ServiceModels, limits: AppLimits, token: str | None) -> dict[str, Any]:
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
        "limits": {"max_body": limits.max_body, "max_batch": limits.caption.max_batch,
                   "max_prompt_chars": limits.caption.max_prompt_chars,
                   "max_latent_elements": limits.max_latent_elements,
                   "max_vae_batch": limits.max_vae_batch,
                   "max_queued_per_model": models.caption.max_pending},
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


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token."""
    if not is_loopback(host) and not token:
        raise ServiceConfigError(
            f"refusing to listen on {host} without a token: anyone who can reach that address "
            f"could use this server. Set {TOKEN_ENV} or pass --token_file PATH (clients send the "
            f"token as 'Authorization: Bearer SECRET' and read the same variable), or bind "
            f"127.0.0.1.")


def create_server(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                  threads: int = DEFAULT_THREADS, max_body: int = DEFAULT_MAX_BODY):
    """A bound (not yet running) waitress server for ``app``; call ``.run()``.

    waitress itself rejects bodies over twice ``max_body`` (with its own plain-text 413) so that it
    never buffers more than that; bodies between the two limits get the app's JSON 413."""
    import waitress

    if threads < 4:
        raise ServiceConfigError(f"threads must be >= 4 so /health never waits, got {threads}")
    return waitress.create_server(app, host=host, port=port, threads=threads, ident="stepvideo",
                                  max_request_body_size=2 * max_body + (1 << 20))


def serve(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          threads: int = DEFAULT_THREADS, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Serve ``app`` with waitress until the process is stopped."""
    create_server(app, host, port, threads, max_body).run()


@dataclass(frozen=True)
class ServerOptions:
    """What ``api/call_remote_server.py`` parses. Part directories relative to ``model_dir``
    (the release's convention) or absolute."""

    model_dir: str
    llm_dir: str = "step_llm"
    clip_dir: str = "hunyuan_clip"
    vae_dir: str = "vae"
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
    vae_tile: str = "auto"          # spatial tiles of the VAE decode: auto, off or N (latent px)
    devices: tuple[str, ...] = ()   # further VAE replicas: chunks decoded on all at once

    def resolved_token(self) -> str | None:
        """``token``, else the stripped contents of ``token_file``, else $STEPVIDEO_API_TOKEN."""
        if self.token:
            return self.token
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ServiceConfigError(f"cannot read --token_file {self.token_file}: {e}") from e
            if not token:
                raise ServiceConfigError(f"--token_file {self.token_file} is empty")
            return token
        return os.environ.get(TOKEN_ENV) or None

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
    from ..download import SERVICE_PARTS, check_model_dir
    from ..text_encoder.local import LocalTextEncoder
    from ..vae.local import LocalVAE

    token = opts.resolved_token()
    check_bind(opts.host, token)
    if opts.max_latent_elements < 1:
        raise ServiceConfigError(f"--max_latent_elements must be >= 1, got "
                                 f"{opts.max_latent_elements}")
    dtype, device = opts.torch_dtype(), opts.torch_device()
    dirs = check_model_dir(opts.model_dir, SERVICE_PARTS, {"step_llm": opts.llm_dir,
                                                           "hunyuan_clip": opts.clip_dir,
                                                           "vae": opts.vae_dir})
    info = {"caption": {"llm_dir": dirs["step_llm"], "clip_dir": dirs["hunyuan_clip"],
                        "dtype": str(dtype).replace("torch.", ""), "clip_dtype": "float32",
                        "device": device},
            "vae": {"vae_dir": dirs["vae"], "dtype": str(dtype).replace("torch.", ""),
                    "device": device}}
    models = ServiceModels(max_pending=max(1, (opts.threads - 4) // 2), info=info)
    app = create_app(models, token, limits=AppLimits(opts.max_body, CaptionLimits(),
                                                     opts.max_latent_elements))

    def start_loading() -> threading.Thread:
        return models.load_in_background(
            lambda: LocalTextEncoder.from_dirs(dirs["step_llm"], dirs["hunyuan_clip"], dtype,
                                               device, cache_size=opts.cache_size),
            lambda: LocalVAE.from_dir(dirs["vae"], dtype, device, tile=opts.vae_tile,
                                      devices=opts.devices))

    return app, models, start_loading


def run_server(opts: ServerOptions) -> None:
    """Check, bind, load in the background, serve. Raises ServiceConfigError / CheckpointError
    before binding when the configuration or the model directory is wrong."""
    app, _, start_loading = build_service(opts)
    server = create_server(app, opts.host, opts.port, opts.threads, opts.max_body)
    logger.info("stepvideo service listening on http://%s:%d (%d threads); loading models",
                opts.host, opts.port, opts.threads)
    start_loading()
    server.run()
