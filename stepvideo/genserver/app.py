"""The generation server's HTTP side: a Flask app over a :class:`JobStore`, served by waitress in
threads of rank 0 while its main thread runs the jobs with the other ranks.

* ``POST /v1/videos``                 JSON job -> 202 the job (status "queued")
* ``GET /v1/videos``                  every job, newest first
* ``GET /v1/videos/{id}``             the job: status, progress 0-100, step/steps, times, parameters
* ``DELETE /v1/videos/{id}``          cancel a queued job; stop a running one at its next step
* ``GET /v1/videos/{id}/content``     the mp4; ``?variant=sidecar`` the JSON, ``=contact_sheet``
  the PNG
* ``GET /v1/videos/{id}/events``      server-sent events: ``status`` on every change, ``progress``
  after every denoising step; the stream ends with the job
* ``GET /health``, ``GET /info``      liveness (no token needed); model, degrees, queue, limits
* ``GET /``                           the web page (``page.html``; no data, so no token needed)

Errors are JSON ``{"error", "status", "service"}`` as in the caption/VAE service: 400 malformed
body or wrong types, 401 token, 404 unknown job or output, 409 content not ready or job over, 413
body too large, 415 not JSON, 422 values the model cannot run, 429 queue full, 503 too many event
streams. The token rule and the WSGI server are the caption/VAE service's
(``stepvideo.service.server``).
"""

from __future__ import annotations

import json
import threading
from importlib import resources
from typing import Any, Callable

from ..service.server import auth_check, json_error
from .jobs import JobError, JobSpec, JobStore, parse_spec

SERVICE = "generation"
MAX_BODY = 64 << 10          # a job is a few hundred bytes of JSON
KEEPALIVE_S = 15.0           # an SSE comment this often keeps proxies and waitress's timeout away
VARIANTS = {"video": "video/mp4", "sidecar": "application/json", "contact_sheet": "image/png"}


def page_html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def create_app(store: JobStore, defaults: JobSpec, info: Callable[[], dict[str, Any]],
               token: str | None):
    from flask import Flask, request

    app = Flask("stepvideo.genserver")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    auth = auth_check(token)
    app.before_request(lambda: None if request.path == "/" else auth())
    _register_errors(app)
    _register_jobs(app, store, defaults)
    _register_content(app, store)
    _register_status(app, store, info, token)
    return app


def _register_errors(app) -> None:
    from flask import request
    from werkzeug.exceptions import HTTPException

    @app.errorhandler(JobError)
    def job_error(e: JobError):
        headers = {"Retry-After": "5"} if e.status in (429, 503) else {}
        return json_error(e.status, str(e), SERVICE, headers)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        message = e.description or e.name
        if e.code == 413:
            message = f"request body is larger than this server's limit of {MAX_BODY} bytes"
        return json_error(e.code or 500, message, SERVICE)

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        app.logger.exception("unexpected error in %s", request.path)
        return json_error(500, f"internal error: {type(e).__name__}: {e}", SERVICE)


def _json_body() -> Any:
    from flask import request

    if request.mimetype != "application/json":
        raise JobError(f"Content-Type {request.mimetype or '(none)'!r} is not accepted; send "
                       "application/json", 415)
    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError) as e:
        raise JobError(f"the body is not valid JSON: {e}") from e


def _register_jobs(app, store: JobStore, defaults: JobSpec) -> None:
    from flask import jsonify

    @app.post("/v1/videos")
    def create():
        spec, notes = parse_spec(_json_body(), defaults, store.limits)
        job = store.submit(spec, notes)
        response = jsonify(job.to_json())
        response.status_code = 202
        response.headers["Location"] = f"/v1/videos/{job.id}"
        return response

    @app.get("/v1/videos")
    def list_jobs():
        return jsonify({"object": "list", "data": [j.to_json() for j in store.list()],
                        "queued": store.queue_length()})

    @app.get("/v1/videos/<job_id>")
    def get(job_id: str):
        return jsonify(store.get(job_id).to_json())

    @app.delete("/v1/videos/<job_id>")
    def cancel(job_id: str):
        return jsonify(store.cancel(job_id).to_json())


def _register_content(app, store: JobStore) -> None:
    from flask import Response, request, send_file

    @app.get("/v1/videos/<job_id>/content")
    def content(job_id: str):
        job = store.get(job_id)
        variant = request.args.get("variant", "video")
        if variant not in VARIANTS:
            raise JobError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
        if job.status != "completed":
            raise JobError(f"job {job_id} is {job.status}; its content is there once it is "
                           "completed", 409 if job.status in ("queued", "in_progress") else 404)
        name = job.outputs.get(variant)
        path = store.job_dir(job_id) / name if name else None
        if path is None or not path.is_file():
            raise JobError(f"job {job_id} has no {variant} output", 404)
        return send_file(path, mimetype=VARIANTS[variant], conditional=True,
                         download_name=f"{job_id}{path.suffix}")

    gate = threading.Lock()

    @app.get("/v1/videos/<job_id>/events")
    def events(job_id: str):
        store.get(job_id)
        with gate:
            if store.streams >= store.limits.max_streams:
                raise JobError(f"{store.streams} event streams are open (the limit); poll "
                               f"GET /v1/videos/{job_id} instead or retry later", 503)
            store.streams += 1
        seen = request.headers.get("Last-Event-ID", "0")
        seen = int(seen) if seen.isdigit() else 0

        def stream(seen: int = seen):
            try:
                yield "retry: 2000\n\n"
                while True:
                    new, over = store.events_after(job_id, seen, KEEPALIVE_S)
                    if not new:
                        yield ": keepalive\n\n"
                    for event in new:
                        seen += 1
                        data = {k: v for k, v in event.items() if k != "event"}
                        yield f"id: {seen}\nevent: {event['event']}\ndata: {json.dumps(data)}\n\n"
                    if over:
                        return
            finally:
                with gate:
                    store.streams -= 1

        return Response(stream(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _register_status(app, store: JobStore, info: Callable[[], dict[str, Any]],
                     token: str | None) -> None:
    from flask import Response, jsonify

    page = page_html()

    @app.get("/")
    def index():
        return Response(page, mimetype="text/html")

    @app.get("/health")
    def health():
        running = store.running
        return jsonify({"status": "ready", "busy": running is not None,
                        "queued": store.queue_length()})

    @app.get("/info")
    def server_info():
        limits = store.limits
        return jsonify({**info(), "queue": {"queued": store.queue_length(),
                                            "running": getattr(store.running, "id", None),
                                            "jobs": len(store.jobs)},
                        "limits": {k: getattr(limits, k) for k in limits.__dataclass_fields__},
                        "auth": "bearer token" if token else "none (loopback only)"})
