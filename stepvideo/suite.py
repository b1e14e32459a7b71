"""Prompt suites for scripted benchmark runs: prompt files, categories, the suite registry, the
verified download of the public Eval list, the run manifest, resumability checks and the summary.

No torch here: ``stepvideo/suite_runner.py`` (the torchrun job behind
``benchmark/run_benchmark.py``) and ``stepvideo/gallery.py`` build on these pieces.

Files
  * prompts: UTF-8 text, one prompt per line. The prompt's *index* is its 1-based line number;
    blank lines are skipped but still count, so indices always match ``sed -n Np``.
  * categories: JSON ``{"categories": [{"name", "first_line", "last_line"}, ...]}`` (or the bare
    list), 1-based inclusive line ranges that must not overlap. Lines outside every range are
    in :data:`UNCATEGORIZED`.

Suites (:data:`SUITES`)
  * ``stepvideo-mini``: the project's own 44 prompts (``stepvideo/assets/suite_mini.txt``), 11
    categories x 2 scenes, each in English then Chinese.
  * ``step-video-t2v-eval``: the public 128 Chinese prompts of the release. Not shipped: fetched
    from :data:`EVAL_URL` on first use, checked against :data:`EVAL_SHA256` and cached under
    :func:`cache_dir`. Its category ranges (reconstructed from the tech report's per-category
    counts) are :data:`EVAL_CATEGORIES`.

Output layout under ``--save_path`` (one directory per prompt, so names never collide)::

    0001-sports/<prompt-slug>-seed<seed>.mp4 / .json / .png
    manifest.jsonl    append-only, one JSON object per finished attempt
    summary.json      rewritten atomically at the end of each run

A run split with ``--shard K/N`` (``stepvideo.shards``) appends to its own part,
``manifest.shard-K-of-N.jsonl``, and writes ``summary.shard-K-of-N.json``; :func:`read_manifest`
reads ``manifest.jsonl`` and then every part, so resuming, the summary and the gallery see all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .fileio import is_temp_file, write_bytes_atomic

UNCATEGORIZED = "uncategorized"
MANIFEST = "manifest.jsonl"
MANIFEST_PARTS = "manifest.shard-*-of-*.jsonl"    # written by sharded runs (stepvideo.shards)
SUMMARY = "summary.json"

EVAL_URL = ("https://raw.githubusercontent.com/stepfun-ai/Step-Video-T2V/main/benchmark/"
            "Step-Video-T2V-Eval")
EVAL_SHA256 = "02a404b88e14b55fb54770ef2e096dc11b102cef56d129dad2cfe90fcb5a965b"
EVAL_FILENAME = "Step-Video-T2V-Eval.txt"


class SuiteError(ValueError):
    """A prompt file, categories file, selection or download problem; the message says the fix."""


# --------------------------------------------------------------------------------------------
# Prompts and categories
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Category:
    name: str
    first_line: int
    last_line: int

    def __contains__(self, line: int) -> bool:
        return self.first_line <= line <= self.last_line


@dataclass(frozen=True)
class PromptEntry:
    """One prompt: ``index`` is its 1-based line number in the prompt file."""

    index: int
    prompt: str
    category: str = UNCATEGORIZED

    @property
    def stem(self) -> str:
        """The prompt's output directory name, e.g. ``0094-3d-animation``."""
        return f"{self.index:04d}-{slug(self.category)}"


# The reconstructed category ranges of Step-Video-T2V-Eval (tech report arXiv 2502.10248,
# Table 7 counts, in the README's order).
EVAL_CATEGORIES: tuple[Category, ...] = (
    Category("Sports", 1, 12), Category("Food", 13, 23), Category("Scenery", 24, 35),
    Category("Animals", 36, 47), Category("Festivals", 48, 58),
    Category("Combined Concepts", 59, 70), Category("Surreal", 71, 81),
    Category("People", 82, 93), Category("3D Animation", 94, 105),
    Category("Cinematography", 106, 116), Category("Style", 117, 128))


def slug(text: str) -> str:
    """``"Combined Concepts"`` -> ``"combined-concepts"``; non-ASCII letters are kept."""
    return re.sub(r"[^\w]+", "-", text.strip().lower(), flags=re.UNICODE).strip("-_") or "x"


def read_prompts(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, prompt) for every non-blank line of a UTF-8 text file."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise SuiteError(f"prompt file {path} does not exist; pass --prompts FILE (one prompt "
                         "per line, UTF-8) or --suite NAME") from e
    except UnicodeDecodeError as e:
        raise SuiteError(f"prompt file {path} is not UTF-8 ({e}); re-save it as UTF-8") from e
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    prompts = [(n, p) for n, p in lines if p]
    if not prompts:
        raise SuiteError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


def parse_categories(data, source: str = "categories") -> list[Category]:
    """Categories from parsed JSON (``{"categories": [...]}`` or a list); checks the ranges."""
    items = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise SuiteError(f"{source}: expected {{\"categories\": [{{\"name\", \"first_line\", "
                         f"\"last_line\"}}, ...]}}, got {type(items).__name__}")
    cats = [_category(item, source) for item in items]
    ordered = sorted(cats, key=lambda c: c.first_line)
    for a, b in zip(ordered, ordered[1:]):
        if b.first_line <= a.last_line:
            raise SuiteError(f"{source}: categories {a.name!r} ({a.first_line}-{a.last_line}) "
                             f"and {b.name!r} ({b.first_line}-{b.last_line}) overlap")
    return cats


def _category(item, source: str) -> Category:
    try:
        cat = Category(str(item["name"]).strip(), item["first_line"], item["last_line"])
    except (KeyError, TypeError) as e:
        raise SuiteError(f"{source}: every category needs name, first_line and last_line; "
                         f"got {item!r}") from e
    lines_ok = all(isinstance(v, int) and not isinstance(v, bool)
                   for v in (cat.first_line, cat.last_line))
    if not cat.name or not lines_ok or not 1 <= cat.first_line <= cat.last_line:
        raise SuiteError(f"{source}: bad category {item!r}: need a name and integer lines "
                         "1 <= first_line <= last_line (1-based, inclusive)")
    return cat


def read_categories(path: str | os.PathLike) -> list[Category]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SuiteError(f"categories file {path} does not exist; pass --categories FILE or "
                         "leave it out (every prompt is then 'uncategorized')") from e
    except json.JSONDecodeError as e:
        raise SuiteError(f"categories file {path} is not valid JSON: {e}") from e
    return parse_categories(data, str(path))


def categorize(prompts: Sequence[tuple[int, str]], categories: Sequence[Category],
               source: str = "categories") -> list[PromptEntry]:
    """Attach categories; a range past the end of the prompt file is an error (wrong file?)."""
    last = max(n for n, _ in prompts)
    for cat in categories:
        if cat.last_line > last:
            raise SuiteError(f"{source}: category {cat.name!r} ends at line {cat.last_line} but "
                             f"the prompt file has {last} lines; is it the categories file for "
                             "these prompts?")
    return [PromptEntry(n, p, next((c.name for c in categories if n in c), UNCATEGORIZED))
            for n, p in prompts]


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------

def parse_line_range(text: str) -> tuple[int, int]:
    """``"3-7"`` -> (3, 7), ``"5"`` -> (5, 5); 1-based and inclusive."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text or "")
    if not m:
        raise SuiteError(f"--lines {text!r}: use A-B (1-based, inclusive), e.g. --lines 1-12")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= first <= last:
        raise SuiteError(f"--lines {text!r}: need 1 <= A <= B")
    return first, last


def select(entries: Sequence[PromptEntry], lines: tuple[int, int] | None = None,
           limit: int | None = None) -> list[PromptEntry]:
    """The entries whose line is in ``lines``, then the first ``limit`` of them."""
    if limit is not None and limit < 1:
        raise SuiteError(f"--limit must be >= 1, got {limit}")
    chosen = [e for e in entries if lines is None or lines[0] <= e.index <= lines[1]]
    if not chosen:
        raise SuiteError(f"--lines {lines[0]}-{lines[1]} selects no prompt; the file's prompts "
                         f"are on lines {entries[0].index}-{entries[-1].index}")
    return chosen[:limit] if limit else chosen


# --------------------------------------------------------------------------------------------
# Suites and the verified download
# --------------------------------------------------------------------------------------------

Fetch = Callable[[str], bytes]


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    sha256: str | None = None      # a --prompts file given for this suite must match it


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("stepvideo-mini", "the project's own bilingual suite: 11 categories x 4 prompts "
                            "(2 scenes, English and Chinese), shipped with the package"),
    Suite("step-video-t2v-eval", "the release's public 128 Chinese prompts in 11 categories; "
                                 f"downloaded from {EVAL_URL} and SHA-256 verified",
          EVAL_SHA256),
)}


def cache_dir() -> Path:
    """``$STEPVIDEO_CACHE_DIR``, else ``$XDG_CACHE_HOME/stepvideo``, else ``~/.cache/stepvideo``."""
    if os.environ.get("STEPVIDEO_CACHE_DIR"):
        return Path(os.environ["STEPVIDEO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stepvideo"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_url(url: str, timeout: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed https URL
        return response.read()


def download_verified(url: str, sha256: str, dest: str | os.PathLike,
                      fetch: Fetch = fetch_url) -> Path:
    """``dest`` if it already holds the right bytes; else fetch ``url``, verify, write it."""
    dest = Path(dest)
    if dest.is_file() and sha256_of(dest.read_bytes()) == sha256:
        return dest
    hint = (f"Download it by hand, check that `sha256sum` prints {sha256}, and pass it with "
            f"--prompts FILE next to --suite, which keeps the suite's categories (or save it as "
            f"{dest})")
    try:
        data = fetch(url)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SuiteError(f"could not download {url}: {e}. {hint}") from e
    got = sha256_of(data)
    if got != sha256:
        raise SuiteError(f"{url} has SHA-256 {got}, expected {sha256}: the file changed upstream "
                         f"or the download was altered; nothing was cached. {hint}")
    write_bytes_atomic(dest, data)
    return dest


def verify_file(path: str | os.PathLike, sha256: str, what: str) -> None:
    got = sha256_of(Path(path).read_bytes())
    if got != sha256:
        raise SuiteError(f"{path} has SHA-256 {got} but {what} is recorded as {sha256}; pass the "
                         "unmodified file, or drop --suite to run it as a plain prompt file")


@dataclass(frozen=True)
class SuiteFiles:
    """Where a run's prompts come from, and their categories."""

    name: str
    prompts: Path
    categories: tuple[Category, ...]
    categories_source: str


def resolve_suite(name: str, prompts: str | None = None,
                  cache: str | os.PathLike | None = None, fetch: Fetch = fetch_url) -> SuiteFiles:
    """A registered suite's files. ``prompts`` overrides the file (checked against the suite's
    recorded hash, so a local copy of the Eval list works offline)."""
    if name not in SUITES:
        raise SuiteError(f"unknown suite {name!r}; choose one of {sorted(SUITES)} or pass "
                         "--prompts FILE")
    if name == "stepvideo-mini":
        assets = resources.files("stepvideo").joinpath("assets")
        cats = read_categories(str(assets.joinpath("suite_mini_categories.json")))
        return SuiteFiles(name, Path(prompts or str(assets.joinpath("suite_mini.txt"))),
                          tuple(cats), "stepvideo/assets/suite_mini_categories.json")
    if prompts:
        verify_file(prompts, EVAL_SHA256, "Step-Video-T2V-Eval")
        path = Path(prompts)
    else:
        path = download_verified(EVAL_URL, EVAL_SHA256, Path(cache or cache_dir()) / EVAL_FILENAME,
                                 fetch)
    return SuiteFiles(name, path, EVAL_CATEGORIES, "stepvideo.suite.EVAL_CATEGORIES")


# --------------------------------------------------------------------------------------------
# Atomic writes and the manifest
# --------------------------------------------------------------------------------------------

@dataclass
class ManifestRecord:
    """One finished attempt at one prompt. ``outputs`` are relative to the save path."""

    index: int
    category: str
    prompt: str
    seed: int
    status: str                                 # "ok" | "failed"
    reason: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    times_s: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    resumed: bool = False                       # ok from outputs an earlier run left
    run_id: str = ""
    finished_at: str = ""

    @classmethod
    def from_json(cls, data: Mapping) -> "ManifestRecord":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def append_manifest(save_path: str | os.PathLike, record: ManifestRecord,
                    name: str = MANIFEST) -> None:
    """Append one JSON line to ``name`` (a shard's own part, else ``manifest.jsonl``) and fsync.
    A line torn by a kill is ended first, so it stays one bad line that :func:`read_manifest`
    skips instead of corrupting the new record."""
    path = Path(save_path) / name
    line = json.dumps(asdict(record), ensure_ascii=False) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def manifest_files(save_path: str | os.PathLike) -> list[Path]:
    """``manifest.jsonl`` (if any), then the shards' parts in name order."""
    save_path = Path(save_path)
    main = [save_path / MANIFEST] if (save_path / MANIFEST).is_file() else []
    return main + sorted(save_path.glob(MANIFEST_PARTS))


def read_manifest(save_path: str | os.PathLike) -> list[ManifestRecord]:
    """Every complete record of every manifest file, in file order (torn or foreign lines are
    skipped). Shards select disjoint lines, so a line's records sit in one part; a line run
    unsharded first and by a shard later has its part's record last."""
    records = []
    for path in manifest_files(save_path):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                data = json.loads(line)
                records.append(ManifestRecord.from_json(data))
            except (json.JSONDecodeError, TypeError, AttributeError):
                continue
    return records


def latest_by_index(records: Iterable[ManifestRecord]) -> dict[int, ManifestRecord]:
    latest: dict[int, ManifestRecord] = {}
    for r in records:
        latest[r.index] = r
    return latest


# --------------------------------------------------------------------------------------------
# Resumability
# --------------------------------------------------------------------------------------------

def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and is_temp_file(p.name)]
    for p in stale:
        p.unlink()
    return stale


@dataclass(frozen=True)
class OutputCheck:
    ok: bool
    reason: str = ""
    sidecar: dict | None = None


def check_outputs(video: str | os.PathLike, sidecar: str | os.PathLike,
                  expected: Mapping[str, object], need_contact_sheet: bool = False) -> OutputCheck:
    """Do ``video`` + ``sidecar`` hold a finished result for these settings?

    The sidecar must parse, name the video and match ``expected`` (keys of its ``settings``); the
    video must decode with the sidecar's frame count."""
    video, sidecar = Path(video), Path(sidecar)
    if not sidecar.is_file() or not video.is_file():
        return OutputCheck(False, "outputs missing")
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        named = Path(record["outputs"]["video"]).name
        settings, frames = record["settings"], int(record["frames"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        return OutputCheck(False, f"sidecar {sidecar.name} unreadable: {type(e).__name__}: {e}")
    if named != video.name:
        return OutputCheck(False, f"sidecar names {named}, not {video.name}")
    changed = [k for k, v in expected.items() if settings.get(k) != v]
    if changed:
        return OutputCheck(False, f"settings changed since it was written: {', '.join(changed)}")
    sheet = Path(str(record["outputs"].get("contact_sheet", ""))).name
    if need_contact_sheet and not (sheet and (video.parent / sheet).is_file()):
        return OutputCheck(False, "contact sheet missing")
    return _check_video(video, frames, record)


def _check_video(video: Path, frames: int, record: dict) -> OutputCheck:
    from .video_io import read_video_info

    try:
        info = read_video_info(str(video))
    except (OSError, RuntimeError, StopIteration, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        return OutputCheck(False, f"{video.name} unreadable: {type(e).__name__}: {first_line}")
    if info["frames"] != frames:
        return OutputCheck(False, f"{video.name} has {info['frames']} frames, sidecar says "
                                  f"{frames}")
    return OutputCheck(True, "", record)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------

@dataclass
class CategoryStats:
    prompts: int = 0
    ok: int = 0
    failed: int = 0
    pending: int = 0          # selected but no finished attempt yet
    total_s: float = 0.0      # sum of per-prompt totals of the ok prompts
    denoise_s: float = 0.0
    steps: int = 0

    @property
    def mean_s(self) -> float | None:
        return self.total_s / self.ok if self.ok else None

    def to_json(self) -> dict:
        out = asdict(self)
        out["mean_s"] = self.mean_s
        out["mean_step_s"] = self.denoise_s / self.steps if self.steps else None
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def prompt_total(record: ManifestRecord) -> float:
    return float(record.times_s.get("total", 0.0))


def summarize(entries: Sequence[PromptEntry], records: Iterable[ManifestRecord],
              run: Mapping[str, object] | None = None) -> dict:
    """Per-category counts and times over ``entries`` from each one's latest manifest record.

    ``mean_step_s`` is the step-weighted mean: the sum of denoising times over the sum of steps
    of the ok prompts. ``total_s`` sums the per-prompt totals of the ok prompts; ``run`` (this
    invocation's counters and wall time) is copied in."""
    latest = latest_by_index(records)
    cats: dict[str, CategoryStats] = {}
    failures = []
    for e in entries:
        stats = cats.setdefault(e.category, CategoryStats())
        stats.prompts += 1
        r = latest.get(e.index)
        if r is None:
            stats.pending += 1
        elif r.status == "ok":
            stats.ok += 1
            stats.total_s += prompt_total(r)
            stats.denoise_s += float(r.times_s.get("denoise", 0.0))
            stats.steps += int(r.steps)
        else:
            stats.failed += 1
            failures.append({"index": e.index, "category": e.category, "reason": r.reason})
    overall = CategoryStats()
    for s in cats.values():
        for k in ("prompts", "ok", "failed", "pending", "total_s", "denoise_s", "steps"):
            setattr(overall, k, getattr(overall, k) + getattr(s, k))
    return {**overall.to_json(), "per_category": {n: s.to_json() for n, s in cats.items()},
            "failures": failures, "run": dict(run or {})}


def format_summary(summary: Mapping) -> str:
    """The summary as a small text table."""
    rows = [f"{'category':<20} {'ok':>4} {'fail':>4} {'todo':>4} {'total s':>9} {'mean s':>8} "
            f"{'s/step':>8}"]
    for name, s in summary["per_category"].items():
        rows.append(f"{name[:20]:<20} {s['ok']:>4} {s['failed']:>4} {s['pending']:>4} "
                    f"{s['total_s']:>9.2f} {_num(s['mean_s']):>8} {_num(s['mean_step_s']):>8}")
    rows.append(f"{'all':<20} {summary['ok']:>4} {summary['failed']:>4} {summary['pending']:>4} "
                f"{summary['total_s']:>9.2f} {_num(summary['mean_s']):>8} "
                f"{_num(summary['mean_step_s']):>8}")
    for f in summary["failures"]:
        rows.append(f"failed: line {f['index']} ({f['category']}): {f['reason']}")
    return "\n".join(rows)


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"
