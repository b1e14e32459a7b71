"""Generation jobs: the API's job request (validated at the edge), the job record, and the store
that queues jobs, keeps them under ``<save_path>/jobs/<id>/job.json`` and tells watchers.

A job's numbers travel to the other ranks as one list of integers (``JobSpec.to_ints``: floats as
their IEEE-754 bits); the prompt never leaves rank 0, which encodes it and broadcasts the
embeddings. A restarted store lists earlier jobs and marks those that were queued or running as
failed, saying why.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import secrets
import struct
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..diffusion.video_pipeline import check_sampling
from ..fileio import is_temp_file, write_json_atomic

logger = logging.getLogger("stepvideo.genserver")

JOB_FILE = "job.json"
TERMINAL = ("completed", "failed", "cancelled")
INT_FIELDS = ("seed", "num_frames", "height", "width", "infer_steps")
FLOAT_FIELDS = ("cfg_scale", "time_shift")
TEXT_FIELDS = ("prompt", "negative_prompt")
MAX_SEED = 2 ** 63 - 1


class JobError(Exception):
    """An API error with its HTTP status."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


@dataclass(frozen=True)
class JobLimits:
    """What one server accepts; /info reports them."""

    max_queue: int = 8
    max_prompt_chars: int = 4000
    max_frames: int = 204
    max_side: int = 1280
    max_steps: int = 200
    max_streams: int = 8          # open /events streams (each holds a server thread)

    def __post_init__(self):
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")


@dataclass(frozen=True)
class JobSpec:
    """One video's parameters (what ``POST /v1/videos`` may set)."""

    prompt: str
    negative_prompt: str
    seed: int
    num_frames: int
    height: int
    width: int
    infer_steps: int
    cfg_scale: float
    time_shift: float

    def to_ints(self) -> list[int]:
        """The numbers for the ranks' broadcast (no text: rank 0 broadcasts the embeddings)."""
        return [getattr(self, k) for k in INT_FIELDS] + [_float_bits(getattr(self, k))
                                                          for k in FLOAT_FIELDS]

    @classmethod
    def from_ints(cls, values: list[int]) -> "JobSpec":
        ints = dict(zip(INT_FIELDS, values[:len(INT_FIELDS)]))
        floats = {k: _bits_float(v) for k, v in zip(FLOAT_FIELDS, values[len(INT_FIELDS):])}
        return cls(prompt="", negative_prompt="", **ints, **floats)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def parse_spec(body: Any, defaults: JobSpec, limits: JobLimits) -> tuple[JobSpec, list[str]]:
    """The JSON body of ``POST /v1/videos`` -> (spec, notes). 400 for a body of the wrong shape or
    types, 422 for values the model cannot run; absent fields take ``defaults``."""
    if not isinstance(body, dict):
        raise JobError("the body must be a JSON object such as {\"prompt\": \"a red kite\"}")
    names = [f.name for f in fields(JobSpec)]
    unknown = sorted(set(body) - set(names))
    if unknown:
        raise JobError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(names)}")
    if "prompt" not in body:
        raise JobError("'prompt' is required: say what the video should show")
    values = {k: _typed(k, v) for k, v in body.items() if v is not None or k == "prompt"}
    spec = replace(defaults, **values)
    return spec, _check_values(spec, limits)


def _typed(name: str, value: Any) -> Any:
    if name in TEXT_FIELDS:
        if not isinstance(value, str):
            raise JobError(f"'{name}' must be a string, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobError(f"'{name}' must be a number, got {json.dumps(value)[:40]}")
    if name in INT_FIELDS:
        if isinstance(value, float) and not value.is_integer():
            raise JobError(f"'{name}' must be an integer, got {value}")
        return int(value)
    if not math.isfinite(value):
        raise JobError(f"'{name}' must be a finite number, got {value}")
    return float(value)


def _check_values(s: JobSpec, limits: JobLimits) -> list[str]:
    def bad(message: str):
        return JobError(message, 422)

    if not s.prompt.strip():
        raise bad("'prompt' is empty; say what the video should show")
    for name in TEXT_FIELDS:
        if len(getattr(s, name)) > limits.max_prompt_chars:
            raise bad(f"'{name}' has {len(getattr(s, name))} characters; this server accepts at "
                      f"most {limits.max_prompt_chars}")
    if not 0 <= s.seed <= MAX_SEED:
        raise bad(f"'seed' must be between 0 and 2**63-1, got {s.seed}")
    if not 1 <= s.infer_steps <= limits.max_steps:
        raise bad(f"'infer_steps' must be between 1 and {limits.max_steps}, got {s.infer_steps}")
    if s.num_frames > limits.max_frames:
        raise bad(f"'num_frames' {s.num_frames} is above this server's limit of "
                  f"{limits.max_frames}")
    for name in ("height", "width"):
        if getattr(s, name) > limits.max_side:
            raise bad(f"'{name}' {getattr(s, name)} is above this server's limit of "
                      f"{limits.max_side} pixels")
    try:  # the CLI's checks (check_sampling), with the API's field names
        notes = check_sampling(s.infer_steps, s.cfg_scale, s.time_shift, s.num_frames, s.height,
                               s.width)
    except ValueError as e:
        raise bad(_field_names(str(e))) from e
    return [_field_names(n) for n in notes]


def _field_names(message: str) -> str:
    """The sizes' messages name CLI flags (``--num_frames``); the API's fields have no dashes."""
    return re.sub(r"--(\w+)", r"'\1'", message)


# --------------------------------------------------------------------------------------------
# Job records
# --------------------------------------------------------------------------------------------

@dataclass
class Job:
    id: str
    spec: JobSpec
    created_at: float
    status: str = "queued"
    step: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)   # variant -> file name in the job dir
    cancel_requested: bool = False
    events: list[dict] = field(default_factory=list)        # in memory: what /events replays

    @property
    def progress(self) -> int:
        if self.status == "completed":
            return 100
        return min(99, 100 * self.step // max(self.spec.infer_steps, 1))

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "object": "video", "status": self.status,
               "progress": self.progress, "step": self.step, "steps": self.spec.infer_steps,
               "created_at": self.created_at, **asdict(self.spec)}
        for key in ("started_at", "finished_at", "error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.notes:
            out["notes"] = self.notes
        if self.cancel_requested and self.status == "in_progress":
            out["cancel_requested"] = True
        if self.outputs:
            out["variants"] = sorted(self.outputs)
        return out

    def record(self) -> dict[str, Any]:
        """What job.json holds."""
        out = {k: v for k, v in self.to_json().items() if k not in ("progress", "object")}
        return {**out, "outputs": self.outputs, "notes": self.notes}

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> "Job":
        spec = JobSpec(**{f.name: d[f.name] for f in fields(JobSpec)})
        return cls(id=d["id"], spec=spec, created_at=d["created_at"], status=d["status"],
                   step=d.get("step", 0), started_at=d.get("started_at"),
                   finished_at=d.get("finished_at"), error=d.get("error"),
                   notes=list(d.get("notes", [])), outputs=dict(d.get("outputs", {})))


class JobStore:
    """The jobs of one server: a bounded FIFO queue, one running job, every record on disk.

    Thread-safe: the HTTP threads submit, read, cancel and watch; rank 0's main thread takes the
    next job and reports its steps and outcome. ``changed`` wakes watchers on every event."""

    def __init__(self, save_path: str | Path, limits: JobLimits = JobLimits()):
        self.root = Path(save_path) / "jobs"
        self.limits = limits
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.changed = threading.Condition()
        self.streams = 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()

    # -- disk ---------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _save(self, job: Job) -> None:
        write_json_atomic(self.job_dir(job.id) / JOB_FILE, job.record())

    def _recover(self) -> None:
        """Earlier jobs back in the list; those the last server left queued or running fail."""
        for path in sorted(self.root.glob(f"*/{JOB_FILE}")):
            for tmp in path.parent.iterdir():
                if is_temp_file(tmp.name):
                    tmp.unlink()
            try:
                job = Job.from_record(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("skipping unreadable job record %s: %s: %s", path,
                               type(e).__name__, e)
                continue
            if job.status not in TERMINAL:
                was = job.status
                job.status, job.finished_at = "failed", job.finished_at or time.time()
                job.error = (f"interrupted: the server stopped while this job was {was}; "
                             "submit it again")
                self._save(job)
            job.events = [self._status_event(job)]
            self.jobs[job.id] = job

    # -- the HTTP side ------------------------------------------------------------------------

    def submit(self, spec: JobSpec, notes: list[str]) -> Job:
        with self.changed:
            if len(self.queue) >= self.limits.max_queue:
                raise JobError(f"the queue is full ({len(self.queue)} jobs waiting, limit "
                               f"{self.limits.max_queue}); retry when one has started", 429)
            job = Job(id="video_" + secrets.token_hex(8), spec=spec, created_at=_now(),
                      notes=notes)
            self.job_dir(job.id).mkdir(parents=True)
            self._save(job)
            self.jobs[job.id] = job
            self.queue.append(job.id)
            self._event(job, self._status_event(job))
            return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError(f"no job {job_id!r} on this server (GET /v1/videos lists them)", 404)
        return job

    def list(self) -> list[Job]:
        with self.changed:
            return sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled now; a running one stops at its next step boundary."""
        with self.changed:
            job = self.get(job_id)
            if job.status in TERMINAL:
                raise JobError(f"job {job_id} is already {job.status}", 409)
            if job.status == "queued":
                self.queue.remove(job_id)
                self._finish(job, "cancelled", "cancelled before it started")
            else:
                job.cancel_requested = True
                self._event(job, self._status_event(job))
            return job

    @property
    def running(self) -> Job | None:
        with self.changed:
            return next((j for j in self.jobs.values() if j.status == "in_progress"), None)

    # -- rank 0's main thread -----------------------------------------------------------------

    def next_job(self, timeout: float) -> Job | None:
        """The oldest queued job, now in progress; None if none came within ``timeout`` s."""
        with self.changed:
            if not self.queue:
                self.changed.wait(timeout)
            if not self.queue:
                return None
            job = self.jobs[self.queue.popleft()]
            job.status, job.started_at = "in_progress", _now()
            self._save(job)
            self._event(job, self._status_event(job))
            return job

    def step(self, job: Job, step: int) -> None:
        with self.changed:
            job.step = step
            self._event(job, {"event": "progress", "step": step, "steps": job.spec.infer_steps,
                              "progress": job.progress})

    def finish(self, job: Job, status: str, error: str | None = None,
               outputs: dict[str, str] | None = None) -> None:
        with self.changed:
            job.outputs = outputs or {}
            self._finish(job, status, error)

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        job.status, job.error, job.finished_at = status, error, _now()
        self._save(job)
        self._event(job, self._status_event(job))

    # -- events -------------------------------------------------------------------------------

    @staticmethod
    def _status_event(job: Job) -> dict:
        return {"event": "status", **job.to_json()}

    def _event(self, job: Job, event: dict) -> None:
        job.events.append(event)
        self.changed.notify_all()

    def events_after(self, job_id: str, seen: int, timeout: float) -> tuple[list[dict], bool]:
        """(events after the first ``seen``, whether the job is over); waits up to ``timeout`` s
        for a new one."""
        with self.changed:
            job = self.get(job_id)
            if len(job.events) <= seen and job.status not in TERMINAL:
                self.changed.wait(timeout)
            return job.events[seen:], job.status in TERMINAL

    def queue_length(self) -> int:
        return len(self.queue)


def _now() -> float:
    return round(time.time(), 3)
