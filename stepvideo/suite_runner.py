"""The prompt-suite runner: a prompt suite through one loaded model, resumable, with a manifest, a
summary and a gallery (``stepvideo.gallery``). It is the job behind ``benchmark/run_benchmark.py``,
``stepvideo-benchmark`` and ``torchrun ... -m stepvideo.suite_runner``.

Launched under torchrun like ``run_parallel.py`` and takes the same model, parallel and sampling
flags (``stepvideo.runner.build_parser``), without ``--prompt``. Rank 0 reads the suite, decides
what is left to do, talks to the service and writes; every rank denoises.

With ``--server URL`` it runs as one plain process and sends each prompt as a job to a running
generation server (``run_parallel.py --serve``, ``stepvideo.genserver``), downloading the outputs
into the same layout; no model is loaded here.

Seeds: ``--seed_mode same`` (default) gives every prompt ``--seed``; ``--seed_mode line`` gives
the prompt on line N ``--seed + N - 1``. Either way a prompt's seed does not depend on which lines
are selected, so reruns and partial runs reproduce the same videos.

Shards: ``--shard K/N`` runs every N-th selected prompt from the K-th (``stepvideo.shards``), so N
jobs on any nodes split one suite into one ``--save_path``; each appends to its own manifest part
and the last to finish (or ``benchmark/report.py``) merges the parts into ``summary.json``.

Failures: a service error for one prompt (text encoding or VAE decode), or a write error, is
recorded in the manifest as ``failed`` with the reason, and the run goes on. Before each prompt,
rank 0 encodes its text and tells the other ranks whether to go ahead (an integer broadcast, as is
the list of prompts left to do; nothing is pickled), so a caption failure never leaves them
waiting in a collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .fileio import write_json_atomic
from .gallery import write_gallery
from .parallel import LaunchEnv
from .runner import (GenerationRequest, PreflightError, build_parser, output_stem,
                     request_from_namespace)
from .service.client import ServiceError
from .shards import Shard, selection_of, write_merged_summary
from .suite import (MANIFEST, SUITES, SUMMARY, UNCATEGORIZED, ManifestRecord, PromptEntry,
                    SuiteError, SuiteFiles, append_manifest, categorize, check_outputs,
                    format_summary, latest_by_index, parse_line_range, read_categories,
                    read_manifest, read_prompts, remove_temp_files, resolve_suite, select,
                    summarize)

SEED_MODES = ("same", "line")
# Sidecar settings that must match for an existing video to count as done.
CHECKED_SETTINGS = ("prompt", "seed", "model_dir", "transformer_dir", "infer_steps", "cfg_scale",
                    "time_shift", "num_frames", "height", "width", "pos_magic", "neg_magic",
                    "denoise_filter", "crop_540p")
# With --server the server's own flags decide the rest (model, pos_magic, filters).
SERVER_CHECKED_SETTINGS = ("prompt", "seed", "infer_steps", "cfg_scale", "time_shift",
                           "num_frames", "height", "width", "neg_magic")
OUTPUT_SUFFIXES = (".mp4", ".json", ".png")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchmarkOptions:
    suite: str | None = None
    prompts: str | None = None
    categories: str | None = None
    lines: str | None = None
    limit: int | None = None
    seed_mode: str = "same"
    gallery: bool = True
    server: str | None = None
    shard: Shard | None = None


def add_suite_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt suite (run_benchmark.py)")
    g.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="a registered suite: " + "; ".join(f"{s.name}: {s.description}"
                                                           for s in SUITES.values())
                        + ". Default stepvideo-mini when --prompts is not given")
    g.add_argument("--prompts", default=None,
                   help="prompt file, one prompt per line (UTF-8); with --suite it replaces the "
                        "suite's file (step-video-t2v-eval: a local copy, SHA-256 checked)")
    g.add_argument("--categories", default=None,
                   help='JSON {"categories": [{"name", "first_line", "last_line"}]} (1-based, '
                        "inclusive); overrides the suite's categories")
    g.add_argument("--lines", default=None,
                   help="only these prompt lines: A-B (1-based, inclusive)")
    g.add_argument("--limit", type=int, default=None, help="at most N prompts (after --lines)")
    g.add_argument("--seed_mode", choices=SEED_MODES, default="same",
                   help="same: every prompt uses --seed; line: the prompt on line N uses "
                        "--seed + N - 1")
    g.add_argument("--no_gallery", action="store_true", help="do not write index.html")
    g.add_argument("--server", default=None, metavar="URL",
                   help="submit the prompts to a running generation server (run_parallel.py "
                        "--serve) instead of loading a model: no torchrun and no --model_dir; "
                        "the sampling flags are sent with each job, the server's own flags "
                        "decide the rest")
    g.add_argument("--shard", default=None, metavar="K/N",
                   help="run the K-th of N disjoint parts of the selection (every N-th prompt "
                        "from the K-th): N jobs, on any nodes, share one --save_path; "
                        "benchmark/report.py merges their summaries")


def build_benchmark_parser() -> argparse.ArgumentParser:
    """``run_parallel.py``'s parser without ``--prompt``, plus the suite flags."""
    p = build_parser("run_benchmark.py", require_prompt=False)
    p.allow_abbrev = False
    p.description = ("Run a prompt suite through Step-Video-T2V under torchrun (same model, "
                     "parallel and sampling flags as run_parallel.py). Writes per prompt "
                     "<save_path>/NNNN-category/<name>.mp4 + .json sidecar + .png contact sheet, "
                     "and manifest.jsonl, summary.json and index.html. Rerunning skips prompts "
                     "whose outputs are complete and match the settings; outputs of other "
                     "settings or seeds in a prompt's folder are replaced, so compare settings "
                     "in separate --save_path folders.")
    add_suite_args(p)
    for action in p._actions:       # --server needs no model; parse_benchmark_args checks
        if action.dest == "model_dir":
            action.required = False
    return p


def parse_benchmark_args(argv: list[str] | None = None
                         ) -> tuple[BenchmarkOptions, GenerationRequest]:
    parser = build_benchmark_parser()
    a = parser.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        parser.error(f"--limit must be >= 1, got {a.limit}")
    if a.model_dir is None and a.server is None:
        parser.error("the following arguments are required: --model_dir (or --server URL)")
    try:
        shard = Shard.parse(a.shard) if a.shard else None
    except SuiteError as e:
        parser.error(str(e))
    opts = BenchmarkOptions(a.suite, a.prompts, a.categories, a.lines, a.limit, a.seed_mode,
                            not a.no_gallery, a.server, shard)
    a.model_dir = a.model_dir or ""
    try:
        return opts, request_from_namespace(a)
    except ValueError as e:
        parser.error(str(e))


# --------------------------------------------------------------------------------------------
# Selection and jobs
# --------------------------------------------------------------------------------------------

def suite_files(opts: BenchmarkOptions) -> SuiteFiles:
    if opts.suite or not opts.prompts:
        files = resolve_suite(opts.suite or "stepvideo-mini", opts.prompts)
    else:
        files = SuiteFiles("custom", Path(opts.prompts), (), "")
    if opts.categories:
        files = dataclasses.replace(files, categories=tuple(read_categories(opts.categories)),
                                    categories_source=opts.categories)
    return files


def select_entries(opts: BenchmarkOptions) -> tuple[SuiteFiles, list[PromptEntry]]:
    """The whole selection (``--lines``, ``--limit``), before any ``--shard``."""
    files = suite_files(opts)
    entries = categorize(read_prompts(files.prompts), files.categories,
                         files.categories_source or "categories")
    lines = parse_line_range(opts.lines) if opts.lines else None
    return files, select(entries, lines, opts.limit)


def shard_entries(shard: Shard | None, entries: list[PromptEntry]) -> list[PromptEntry]:
    if shard is None:
        return entries
    mine = shard.select(entries)
    if not mine:
        raise SuiteError(f"--shard {shard.index}/{shard.count} selects no prompt: the selection "
                         f"has {len(entries)}; use N <= {len(entries)}")
    return mine


@dataclass(frozen=True)
class PromptJob:
    entry: PromptEntry
    request: GenerationRequest
    checked: tuple[str, ...] = CHECKED_SETTINGS

    @property
    def directory(self) -> Path:
        return Path(self.request.save_path)

    def path(self, suffix: str) -> Path:
        return Path(output_stem(self.request) + suffix)

    def expected(self) -> dict:
        expected = {k: getattr(self.request, k) for k in self.checked}
        if self.checked == CHECKED_SETTINGS:  # a run with its own model: caching and --quantize
            expected.update(self.request.cache_settings(), quantize=self.request.memory.quantize)
        return expected

    def check(self):
        return check_outputs(self.path(".mp4"), self.path(".json"), self.expected(),
                             need_contact_sheet=self.request.contact_sheet)


def make_jobs(base: GenerationRequest, entries: list[PromptEntry], seed_mode: str,
              checked: tuple[str, ...] = CHECKED_SETTINGS) -> list[PromptJob]:
    def seed(e: PromptEntry) -> int:
        return base.seed if seed_mode == "same" else base.seed + e.index - 1

    return [PromptJob(e, dataclasses.replace(base, prompt=e.prompt, seed=seed(e),
                                             save_path=os.path.join(base.save_path, e.stem)),
                      checked)
            for e in entries]


def relative_outputs(job: PromptJob, save_path: str) -> dict[str, str]:
    names = {"video": ".mp4", "sidecar": ".json"}
    if job.request.contact_sheet:
        names["contact_sheet"] = ".png"
    return {k: os.path.relpath(job.path(ext), save_path) for k, ext in names.items()}


def remove_stale_outputs(job: PromptJob) -> list[Path]:
    """Outputs an earlier run left in this prompt's directory under another name (the prompt or
    seed at this line changed), so every prompt directory ends with exactly one video."""
    keep = {job.path(s).name for s in OUTPUT_SUFFIXES}
    if not job.directory.is_dir():
        return []
    stale = [p for p in job.directory.iterdir()
             if p.is_file() and p.suffix in OUTPUT_SUFFIXES and p.name not in keep]
    for p in stale:
        p.unlink()
    return stale


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class BenchmarkRun:
    """One invocation: the plan (rank 0), then every remaining prompt on every rank."""

    def __init__(self, gen, base: GenerationRequest, run_id: str, log: Callable[[str], None],
                 shard: Shard | None = None):
        self.gen, self.base, self.run_id, self.log, self.shard = gen, base, run_id, log, shard
        self.manifest = shard.manifest if shard else MANIFEST
        self.is_main = gen.ctx.is_main if gen else True
        self.counts = {"generated": 0, "skipped": 0, "failed": 0}

    @property
    def load_seconds(self) -> float:
        return self.gen.load_seconds

    @property
    def world_size(self) -> int:
        return self.gen.ctx.world_size

    # -- rank 0 --------------------------------------------------------------------------------

    def plan(self, jobs: list[PromptJob]) -> list[PromptJob]:
        """Clean interrupted writes; keep the jobs whose outputs are missing or broken."""
        latest = latest_by_index(read_manifest(self.base.save_path))
        todo = []
        for job in jobs:
            remove_temp_files(job.directory)
            check = job.check()
            if check.ok:
                self.counts["skipped"] += 1
                self._note_existing(job, check.sidecar, latest.get(job.entry.index))
                continue
            if check.reason != "outputs missing":
                self.log(f"line {job.entry.index}: redoing ({check.reason})")
            for p in remove_stale_outputs(job):
                self.log(f"line {job.entry.index}: removed stale output {p}")
            todo.append(job)
        return todo

    def _note_existing(self, job: PromptJob, sidecar: dict, last: ManifestRecord | None) -> None:
        """Outputs are complete; make sure the manifest says so (a kill can land between the last
        rename and the manifest line)."""
        outputs = relative_outputs(job, self.base.save_path)
        if last is not None and last.status == "ok" and last.outputs == outputs:
            return
        times = {k: float(v) for k, v in sidecar.get("times_s", {}).items()
                 if not k.startswith("load_")}
        times.setdefault("total", sum(times.get(k, 0.0) for k in
                                      ("text_encode", "denoise", "vae_decode", "write")))
        self._append(job, "ok", outputs=outputs, times=times, resumed=True)

    def _append(self, job: PromptJob, status: str, reason: str = "", outputs=None, times=None,
                resumed: bool = False) -> ManifestRecord:
        r = job.request
        record = ManifestRecord(job.entry.index, job.entry.category, r.prompt, r.seed, status,
                                reason, outputs or {}, {k: round(v, 4) for k, v in
                                                        (times or {}).items()},
                                r.infer_steps, resumed, self.run_id, now_iso())
        append_manifest(self.base.save_path, record, self.manifest)
        return record

    # -- every rank ----------------------------------------------------------------------------

    def run_job(self, job: PromptJob, position: str) -> None:
        t0 = time.perf_counter()
        text, refusal = None, None
        if self.is_main:  # encode first, so a caption failure is known before the ranks commit
            try:
                text = self.gen.encode_text(job.request)
            except ServiceError as e:
                refusal = f"text encoding failed: {e}"
        refused = self.gen.ctx.broadcast_ints([int(refusal is not None)] if self.is_main else None,
                                              self.gen.device)[0]
        if refused:
            return self._failed(job, refusal, position)
        try:
            record = self.gen.generate(job.request, progress=self.is_main, text=text)
        except (ServiceError, OSError, ValueError) as e:
            if not self.is_main:
                raise
            return self._failed(job, f"{type(e).__name__}: {e}", position)
        if self.is_main:
            self._finish(job, record, t0, position)

    def _finish(self, job: PromptJob, record: dict, t0: float, position: str) -> None:
        times = {k: float(v) for k, v in record["times_s"].items() if not k.startswith("load_")}
        check = job.check()
        times["total"] = time.perf_counter() - t0
        if not check.ok:
            return self._failed(job, f"outputs did not validate after writing: {check.reason}",
                                position)
        self._append(job, "ok", outputs=relative_outputs(job, self.base.save_path), times=times)
        self.counts["generated"] += 1
        self.log(f"{position} line {job.entry.index} ({job.entry.category}): ok in "
                 f"{times['total']:.1f} s (denoise {times['denoise']:.2f} s, "
                 f"{times['denoise_step_mean']:.3f} s/step) -> {job.path('.mp4')}")

    def _failed(self, job: PromptJob, reason: str, position: str) -> None:
        if not self.is_main:
            return
        reason = " ".join(reason.split())[:500]     # ffmpeg errors carry a banner of many lines
        self._append(job, "failed", reason=reason)
        self.counts["failed"] += 1
        self.log(f"{position} line {job.entry.index} ({job.entry.category}): FAILED: {reason}")


# --------------------------------------------------------------------------------------------
# Entry
# --------------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"benchmark: {message}", flush=True)


def describe_selection(files: SuiteFiles, entries: list[PromptEntry]) -> str:
    cats = sorted({e.category for e in entries} - {UNCATEGORIZED})
    return (f"{len(entries)} prompt(s) from {files.prompts} (suite {files.name}; lines "
            f"{entries[0].index}-{entries[-1].index}; categories: {', '.join(cats) or 'none'})")


def run_summary(run: BenchmarkRun, files: SuiteFiles, entries: list[PromptEntry],
                started: float, started_at: str) -> dict:
    info = {"run_id": run.run_id, "shard": run.shard.tag if run.shard else None, "started_at": started_at, "finished_at": now_iso(),
            "wall_s": round(time.perf_counter() - started, 3), "selected": len(entries),
            **run.counts, "load_transformer_s": round(run.load_seconds, 3),
            "world_size": run.world_size, "suite": files.name,
            "prompts_file": str(files.prompts)}
    return summarize(entries, read_manifest(run.base.save_path), info)


def main(argv: list[str] | None = None,
         gallery: Callable[[str], str] | None = write_gallery) -> int:
    """The torchrun entry. ``gallery(save_path) -> path`` is called on rank 0 at the end (unless
    ``--no_gallery``; ``None`` writes none)."""
    from .runner import VideoGenerator

    opts, base = parse_benchmark_args(argv)
    if opts.server:
        return run_on_server(opts, base, gallery)
    env = LaunchEnv.from_environ()
    rank = env.rank
    started, started_at = time.perf_counter(), now_iso()
    try:
        files, selection = select_entries(opts)  # every rank reads the suite; rank 0 plans
        entries = shard_entries(opts.shard, selection)
        if rank == 0:
            log(describe_selection(files, entries)
                + (f", shard {opts.shard.index}/{opts.shard.count} of {len(selection)}"
                   if opts.shard else ""))
        gen = VideoGenerator(base, env)
    except (PreflightError, SuiteError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    run = BenchmarkRun(gen, base, f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}", log,
                       opts.shard)
    jobs = make_jobs(base, entries, opts.seed_mode)
    todo = None
    if run.is_main:
        todo = [job.entry.index for job in run.plan(jobs)]
        log(f"{len(jobs) - len(todo)} already done, {len(todo)} to run; results go to "
            f"{os.path.abspath(base.save_path)}")
    wanted = set(gen.ctx.broadcast_ints(todo, gen.device))
    todo = [job for job in jobs if job.entry.index in wanted]
    try:
        for i, job in enumerate(todo, start=1):
            run.run_job(job, f"[{i}/{len(todo)}]")
    except KeyboardInterrupt:
        if run.is_main:
            print(f"\ninterrupted after {run.counts['generated']} new video(s); finished outputs "
                  "are kept and a rerun resumes", file=sys.stderr)
        return 130
    if run.is_main:
        finish(run, files, entries, started, started_at, selection)
    gen.close()
    if run.is_main and opts.gallery and gallery is not None:
        log(f"gallery {gallery(base.save_path)}")
    return 0


def finish(run: BenchmarkRun, files: SuiteFiles, entries: list[PromptEntry], started: float,
           started_at: str, selection: list[PromptEntry]) -> None:
    """The summary of this run's prompts; a shard writes its part (with the whole selection) and
    then ``summary.json`` merged from every part so far."""
    summary = run_summary(run, files, entries, started, started_at)
    save = run.base.save_path
    if run.shard:
        summary["selection"] = selection_of(selection)
    path = write_json_atomic(os.path.join(save, run.shard.summary if run.shard else SUMMARY),
                             summary)
    print(format_summary(summary), flush=True)
    log(f"this run: {run.counts['generated']} generated, {run.counts['skipped']} already done, "
        f"{run.counts['failed']} failed in {summary['run']['wall_s']:.1f} s")
    log(f"summary {path}; manifest {os.path.join(save, run.manifest)}")
    if run.shard:
        try:
            log(f"merged summary of the shards so far: {write_merged_summary(save)}")
        except SuiteError as e:
            log(f"no merged summary: {e}")


# --------------------------------------------------------------------------------------------
# --server: the prompts as jobs of a running generation server
# --------------------------------------------------------------------------------------------

class ServerRun(BenchmarkRun):
    """Each prompt a job of ``run_parallel.py --serve``; its outputs downloaded into the suite's
    layout, so manifest, resume, summary and gallery are the same as with a local model."""

    def __init__(self, client, info: dict, base: GenerationRequest, run_id: str,
                 log: Callable[[str], None], shard: Shard | None = None):
        super().__init__(None, base, run_id, log, shard)
        self.client, self.info = client, info

    @property
    def load_seconds(self) -> float:
        return float(self.info["model"]["load_s"])

    @property
    def world_size(self) -> int:
        return int(self.info["degrees"]["world_size"])

    def run_job(self, job: PromptJob, position: str) -> None:
        import json

        from .genserver.client import GenerationError

        r, t0 = job.request, time.perf_counter()
        try:
            job_id = self.client.submit(
                prompt=r.prompt, negative_prompt=r.neg_magic, seed=r.seed,
                num_frames=r.num_frames, height=r.height, width=r.width,
                infer_steps=r.infer_steps, cfg_scale=r.cfg_scale, time_shift=r.time_shift)["id"]
            done = self.client.wait(job_id)
            if done["status"] != "completed":
                return self._failed(job, f"server job {job_id} {done['status']}: "
                                         f"{done.get('error', '')}", position)
            record = json.loads(self.client.content(job_id, "sidecar"))
            outputs = {"video": str(self.client.download(job_id, job.path(".mp4")))}
            if "contact_sheet" in done.get("variants", []):
                outputs["contact_sheet"] = str(self.client.download(
                    job_id, job.path(".png"), "contact_sheet"))
            record["outputs"] = {k: os.path.abspath(v) for k, v in outputs.items()}
            record["server_job"] = {"url": self.client.url, "id": job_id}
            write_json_atomic(job.path(".json"), record)
        except (GenerationError, OSError, ValueError) as e:
            return self._failed(job, f"{type(e).__name__}: {e}", position)
        self._finish(job, record, t0, position)


def run_on_server(opts: BenchmarkOptions, base: GenerationRequest,
                  gallery: Callable[[str], str] | None) -> int:
    from .genserver.client import GenerationClient, GenerationError

    started, started_at = time.perf_counter(), now_iso()
    client = GenerationClient(opts.server)
    try:
        files, selection = select_entries(opts)
        entries = shard_entries(opts.shard, selection)
        log(describe_selection(files, entries)
            + (f", shard {opts.shard.index}/{opts.shard.count} of {len(selection)}"
               if opts.shard else ""))
        info = client.info()
    except (SuiteError, GenerationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = ServerRun(client, info, base, f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}", log,
                    opts.shard)
    todo = run.plan(make_jobs(base, entries, opts.seed_mode, SERVER_CHECKED_SETTINGS))
    log(f"{len(entries) - len(todo)} already done, {len(todo)} to run on {client.url}; results "
        f"go to {os.path.abspath(base.save_path)}")
    try:
        for i, job in enumerate(todo, start=1):
            run.run_job(job, f"[{i}/{len(todo)}]")
    except KeyboardInterrupt:
        print(f"\ninterrupted after {run.counts['generated']} new video(s); jobs already "
              "submitted keep running on the server", file=sys.stderr)
        return 130
    finish(run, files, entries, started, started_at, selection)
    if opts.gallery and gallery is not None:
        log(f"gallery {gallery(base.save_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
