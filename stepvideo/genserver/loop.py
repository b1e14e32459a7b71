"""The ranks' job loop: ``torchrun ... run_parallel.py --serve`` loads the DiT once per rank
(``runner.VideoGenerator``), then every rank runs :func:`serve`.

Rank 0 serves HTTP in waitress's threads and, in its main thread, takes the next job from the
store. Each round it broadcasts one list of integers (nothing is pickled):

* ``[IDLE]`` when no job came within ``HEARTBEAT_S`` (the other ranks wait in that broadcast, so
  it also keeps them inside the process group's timeout), or
* ``[JOB, seed, num_frames, height, width, infer_steps, bits(cfg_scale), bits(time_shift)]``.

For a job, rank 0 encodes the prompt and broadcasts go/no-go (a caption failure or a cancel
before the first step ends the job on every rank), then the embeddings
(``ParallelContext.broadcast_text``). After every denoising step rank 0 broadcasts ``[stop]``:
1 when the job was cancelled, and then every rank leaves the step loop at the same boundary and
waits for the next round. Rank 0 decodes and writes into ``<save_path>/jobs/<id>/``.

The runner passes its ``VideoGenerator`` and base ``GenerationRequest`` in (this module does not
import the runner, which imports it).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..service.server import ServerOptions, check_bind, create_server
from .app import MAX_BODY, create_app
from .jobs import Job, JobLimits, JobSpec, JobStore

IDLE, JOB = 0, 1
HEARTBEAT_S = 2.0
DEFAULT_PORT = 8000


class BindError(RuntimeError):
    """Rank 0 could not bind the HTTP port (raised on every rank)."""


class JobCancelled(Exception):
    """Raised on every rank at the step boundary where rank 0 saw a cancel."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    threads: int = 16
    limits: JobLimits = JobLimits()

    @classmethod
    def checked(cls, model_dir: str, host: str, port: int, token_file: str | None,
                max_queue: int) -> "ServeOptions":
        """The token ($STEPVIDEO_API_TOKEN or ``token_file``) and the bind rule, checked before
        the model loads; ValueError (a ``ServiceConfigError``) names what to change."""
        token = ServerOptions(model_dir, token_file=token_file).resolved_token()
        check_bind(host, token)
        return cls(host, port, token, limits=JobLimits(max_queue=max_queue))


def defaults_of(req) -> JobSpec:
    """The server's preset: what a job gets for the fields it leaves out."""
    return JobSpec(prompt="", negative_prompt=req.neg_magic, seed=req.seed,
                   num_frames=req.num_frames, height=req.height, width=req.width,
                   infer_steps=req.infer_steps, cfg_scale=req.cfg_scale,
                   time_shift=req.time_shift)


def job_request(base, spec: JobSpec, save_path: str = ""):
    """The runner's request for one job (every rank builds it from the broadcast numbers)."""
    return dataclasses.replace(base, prompt=spec.prompt, neg_magic=spec.negative_prompt,
                               seed=spec.seed, num_frames=spec.num_frames, height=spec.height,
                               width=spec.width, infer_steps=spec.infer_steps,
                               cfg_scale=spec.cfg_scale, time_shift=spec.time_shift,
                               save_path=save_path or base.save_path, name_suffix="")


def server_info(gen, base) -> dict[str, Any]:
    from .. import __version__

    return {"model": {"model_dir": os.path.abspath(base.model_dir),
                      "transformer_dir": base.transformer_dir, "preset": base.preset,
                      "device": str(gen.device), "dtype": str(gen.dtype).replace("torch.", ""),
                      "attn_backend": gen.attn_backend, "caption_url": base.caption_url,
                      "vae_url": base.vae_url, "load_s": round(gen.load_seconds, 3)},
            "degrees": {**dataclasses.asdict(base.parallel), "world_size": gen.ctx.world_size},
            "defaults": dataclasses.asdict(defaults_of(base)),
            "stepvideo_version": __version__}


class Rank0:
    """Rank 0's side: the store, the HTTP server thread, and the job in hand."""

    def __init__(self, gen, base, opts: ServeOptions):
        self.gen, self.base, self.opts = gen, base, opts
        self.store = JobStore(base.save_path, opts.limits)
        app = create_app(self.store, defaults_of(base), lambda: server_info(gen, base),
                         opts.token)
        self.server = create_server(app, opts.host, opts.port, opts.threads, MAX_BODY)
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self.job: Job | None = None

    def start(self) -> None:
        self.thread.start()
        host, port = self.server.effective_host, self.server.effective_port
        print(f"serving on http://{host}:{port} (web page at /, API at /v1/videos); "
              f"{len(self.store.jobs)} earlier job(s) under {self.store.root}", flush=True)

    def next_command(self) -> list[int]:
        self.job = self.store.next_job(HEARTBEAT_S)
        return [JOB, *self.job.spec.to_ints()] if self.job else [IDLE]

    def close(self) -> None:
        """The job in hand (if the loop was left during one) is recorded as failed."""
        if self.job is not None and self.job.status == "in_progress":
            self.store.finish(self.job, "failed", "interrupted: the server was stopped")
        self.server.close()


def serve(gen, base, opts: ServeOptions) -> None:
    """Run jobs until the process is stopped (every rank calls this)."""
    ctx = gen.ctx
    rank0, problem = None, None
    if ctx.is_main:
        try:
            rank0 = Rank0(gen, base, opts)
        except OSError as e:     # the port is taken, or <save_path>/jobs cannot be written
            problem = (f"cannot serve on {opts.host}:{opts.port} from {base.save_path}: "
                       f"{type(e).__name__}: {e}")
    failed = ctx.broadcast_ints([int(problem is not None)] if ctx.is_main else None, gen.device)
    if failed[0]:
        raise BindError(problem or "rank 0 could not start the HTTP server")
    try:
        if rank0:
            rank0.start()
        while True:
            command = ctx.broadcast_ints(rank0.next_command() if rank0 else None, gen.device)
            if command[0] == JOB:
                run_job(gen, base, JobSpec.from_ints(command[1:]), rank0)
    finally:
        if rank0:
            rank0.close()


def run_job(gen, base, spec: JobSpec, rank0: Rank0 | None) -> None:
    """One job on every rank; rank 0 records the outcome in the store."""
    ctx, job = gen.ctx, rank0.job if rank0 else None
    store = rank0.store if rank0 else None
    req = job_request(base, job.spec if job else spec,
                      str(store.job_dir(job.id)) if job else "")
    t0 = time.perf_counter()
    text, refusal = None, None
    if job:
        try:
            text = gen.encode_text(req)
        except Exception as e:  # noqa: BLE001 - before go/no-go: the other ranks just skip
            refusal = ("failed", f"text encoding failed: {type(e).__name__}: {e}")
        if job.cancel_requested:
            refusal = ("cancelled", "cancelled before the first step")
    if ctx.broadcast_ints([int(refusal is not None)] if job else None, gen.device)[0]:
        if job:
            store.finish(job, *refusal)
        return

    def on_step(i: int, x) -> None:
        stop = ctx.broadcast_ints([int(job.cancel_requested)] if job else None, gen.device)[0]
        if job:
            store.step(job, i + 1)
        if stop:
            raise JobCancelled

    try:
        record = gen.generate(req, progress=False, text=text, on_step=on_step)
    except JobCancelled:
        if job:
            store.finish(job, "cancelled", f"cancelled after step {job.step} of "
                                           f"{spec.infer_steps}")
            log(f"job {job.id} cancelled at step {job.step}")
        return
    except Exception as e:  # noqa: BLE001 - after the last step only rank 0 is working
        if not job or job.step < spec.infer_steps:
            raise                       # inside the collectives: the ranks cannot go on
        store.finish(job, "failed", " ".join(f"{type(e).__name__}: {e}".split())[:1000])
        log(f"job {job.id} failed: {store.get(job.id).error}")
        return
    if job:
        outputs = {k: os.path.basename(v) for k, v in record["outputs"].items()}
        store.finish(job, "completed", outputs=outputs)
        log(f"job {job.id} completed in {time.perf_counter() - t0:.1f} s "
            f"({record['frames']} frames, {record['width']}x{record['height']})")


def log(message: str) -> None:
    print(f"server: {message}", file=sys.stderr, flush=True)
