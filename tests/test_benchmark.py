"""Scripted benchmark runs: stepvideo.suite (prompt files, categories, verified download,
manifest, summary) and benchmark/run_benchmark.py end to end on the tiny model: a real service on
127.0.0.1, torchrun with 2 ranks over a few lines of the public Eval list, a kill (SIGKILL to the
process groups) once the first video appears, a rerun that finishes the job, and the gallery
rendered in headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from stepvideo.suite_runner import build_benchmark_parser, parse_benchmark_args
from stepvideo.suite import (EVAL_CATEGORIES, EVAL_SHA256, EVAL_URL, UNCATEGORIZED, Category,
                             ManifestRecord, PromptEntry, SuiteError, append_manifest,
                             categorize, download_verified, is_temp_file, latest_by_index,
                             parse_categories, parse_line_range, read_categories, read_manifest,
                             read_prompts, remove_temp_files, resolve_suite, select, sha256_of,
                             slug, summarize)
from tests.helpers import running_service

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmark" / "run_benchmark.py"
EVAL_DIR = Path(os.environ.get("STEPVIDEO_EVAL_DIR", ROOT.parent / "shared" / "eval"))
EVAL_TXT = EVAL_DIR / "Step-Video-T2V-Eval.txt"
EVAL_CATS = EVAL_DIR / "categories.json"
CHROMIUM = "/usr/bin/chromium"
SIZE = ["--num_frames", "17", "--height", "128", "--width", "128", "--infer_steps", "2",
        "--device", "cpu"]
LINES = ("12-20", 3)                   # --lines, --limit: lines 12 (Sports), 13 and 14 (Food)
SELECTED = {12: "0012-sports", 13: "0013-food", 14: "0014-food"}
CJK = re.compile(r"[\u4e00-\u9fff]")

needs_eval = pytest.mark.skipif(not EVAL_TXT.is_file(), reason=f"{EVAL_TXT} not found; set "
                                "STEPVIDEO_EVAL_DIR to the folder with Step-Video-T2V-Eval.txt")


# --------------------------------------------------------------------------------------------
# Prompt files, categories, selection
# --------------------------------------------------------------------------------------------

def test_parse_line_range():
    assert parse_line_range("3-7") == (3, 7)
    assert parse_line_range(" 2 - 4 ") == (2, 4)
    assert parse_line_range("5") == (5, 5)
    for bad in ("0-3", "5-2", "a-b", "", "1-2-3", "-4"):
        with pytest.raises(SuiteError, match="--lines"):
            parse_line_range(bad)


def test_read_prompts_keeps_line_numbers(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufefffirst\n\n  second  \r\nthird".encode("utf-8"))
    assert read_prompts(f) == [(1, "first"), (3, "second"), (4, "third")]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SuiteError, match="not UTF-8"):
        read_prompts(tmp_path / "latin1.txt")
    with pytest.raises(SuiteError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(SuiteError, match="no prompts"):
        read_prompts(tmp_path / "blank.txt")


def test_select_lines_and_limit():
    entries = [PromptEntry(n, f"p{n}") for n in (1, 2, 4, 5, 6)]
    assert [e.index for e in select(entries, (2, 5))] == [2, 4, 5]
    assert [e.index for e in select(entries, (2, 6), limit=2)] == [2, 4]
    assert [e.index for e in select(entries, None, limit=1)] == [1]
    assert len(select(entries)) == 5
    with pytest.raises(SuiteError, match="selects no prompt"):
        select(entries, (7, 9))
    with pytest.raises(SuiteError, match="--limit"):
        select(entries, limit=0)


def test_categories_validation():
    cats = parse_categories({"categories": [{"name": "A", "first_line": 1, "last_line": 2},
                                            {"name": "B", "first_line": 4, "last_line": 4}]})
    entries = categorize([(1, "a"), (2, "b"), (3, "c"), (4, "d")], cats)
    assert [e.category for e in entries] == ["A", "A", UNCATEGORIZED, "B"]
    assert parse_categories([{"name": "A", "first_line": 1, "last_line": 1}]) == \
        [Category("A", 1, 1)]
    with pytest.raises(SuiteError, match="overlap"):
        parse_categories([{"name": "A", "first_line": 1, "last_line": 3},
                          {"name": "B", "first_line": 3, "last_line": 4}])
    with pytest.raises(SuiteError, match="needs name"):
        parse_categories([{"name": "A", "first_line": 1}])
    with pytest.raises(SuiteError, match="bad category"):
        parse_categories([{"name": "A", "first_line": 3, "last_line": 2}])
    with pytest.raises(SuiteError, match="bad category"):
        parse_categories([{"name": "A", "first_line": "1", "last_line": 2}])
    with pytest.raises(SuiteError, match="ends at line 9"):
        categorize([(1, "a")], [Category("A", 1, 9)])


def test_slug_and_stem():
    assert slug("Combined Concepts") == "combined-concepts"
    assert slug("3D Animation") == "3d-animation"
    assert slug("风格 Style") == "风格-style"
    assert PromptEntry(94, "x", "3D Animation").stem == "0094-3d-animation"


def test_shipped_mini_suite():
    files = resolve_suite("stepvideo-mini")
    entries = categorize(read_prompts(files.prompts), files.categories)
    assert len(entries) == 44 and [e.index for e in entries] == list(range(1, 45))
    names = [c.name for c in files.categories]
    assert names == [c.name for c in EVAL_CATEGORIES]
    for name in names:
        prompts = [e.prompt for e in entries if e.category == name]
        assert len(prompts) == 4
        chinese = [p for p in prompts if CJK.search(p)]
        assert len(chinese) == 2, f"{name}: expected 2 Chinese and 2 English prompts"
        assert all(p.isascii() for p in prompts if p not in chinese)


@needs_eval
def test_eval_categories_match_shared_file():
    shared = read_categories(EVAL_CATS)
    assert shared == list(EVAL_CATEGORIES)
    entries = categorize(read_prompts(EVAL_TXT), shared, str(EVAL_CATS))
    assert len(entries) == 128 and entries[-1].index == 128
    counts = {c.name: sum(e.category == c.name for e in entries) for c in shared}
    assert counts == {"Sports": 12, "Food": 11, "Scenery": 12, "Animals": 12, "Festivals": 11,
                      "Combined Concepts": 12, "Surreal": 11, "People": 12, "3D Animation": 12,
                      "Cinematography": 11, "Style": 12}
    assert entries[93].category == "3D Animation" and UNCATEGORIZED not in counts


# --------------------------------------------------------------------------------------------
# Verified download (never the network: file:// URLs and a stand-in fetch)
# --------------------------------------------------------------------------------------------

@needs_eval
def test_recorded_hash_is_the_shared_file():
    assert sha256_of(EVAL_TXT.read_bytes()) == EVAL_SHA256


@needs_eval
def test_download_verified_file_url_and_cache(tmp_path):
    dest = tmp_path / "cache" / "eval.txt"
    path = download_verified(EVAL_TXT.as_uri(), EVAL_SHA256, dest)
    assert path == dest and dest.read_bytes() == EVAL_TXT.read_bytes()

    def offline(url):
        raise AssertionError("a verified cache must not be fetched again")

    assert download_verified(EVAL_URL, EVAL_SHA256, dest, fetch=offline) == dest
    assert not [p for p in dest.parent.iterdir() if is_temp_file(p.name)]


def test_download_rejects_wrong_hash(tmp_path):
    src = tmp_path / "changed.txt"
    src.write_text("not the eval list\n", encoding="utf-8")
    dest = tmp_path / "cache" / "eval.txt"
    with pytest.raises(SuiteError) as e:
        download_verified(src.as_uri(), EVAL_SHA256, dest)
    assert src.as_uri() in str(e.value) and EVAL_SHA256 in str(e.value)
    assert sha256_of(src.read_bytes()) in str(e.value)
    assert not dest.exists()


def test_download_network_error_names_url_and_hash(tmp_path):
    def no_network(url):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(SuiteError) as e:
        download_verified(EVAL_URL, EVAL_SHA256, tmp_path / "eval.txt", fetch=no_network)
    message = str(e.value)
    assert EVAL_URL in message and EVAL_SHA256 in message and "--prompts" in message


@needs_eval
def test_eval_suite_offline(tmp_path):
    data = EVAL_TXT.read_bytes()
    files = resolve_suite("step-video-t2v-eval", cache=tmp_path, fetch=lambda url: data)
    assert files.prompts.read_bytes() == data and files.categories == EVAL_CATEGORIES
    assert resolve_suite("step-video-t2v-eval", prompts=str(EVAL_TXT)).prompts == EVAL_TXT
    edited = tmp_path / "edited.txt"
    edited.write_bytes(data + b"\nextra")
    with pytest.raises(SuiteError, match=EVAL_SHA256):
        resolve_suite("step-video-t2v-eval", prompts=str(edited))
    with pytest.raises(SuiteError, match="unknown suite"):
        resolve_suite("nope")


# --------------------------------------------------------------------------------------------
# Manifest, temp files, summary
# --------------------------------------------------------------------------------------------

def record(index, status, category="A", total=0.0, denoise=0.0, steps=2, reason=""):
    return ManifestRecord(index, category, f"p{index}", 7, status, reason,
                          times_s={"total": total, "denoise": denoise}, steps=steps)


def test_manifest_append_survives_torn_line(tmp_path):
    append_manifest(tmp_path, record(1, "failed", reason="boom"))
    with open(tmp_path / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write('{"index": 2, "categ')                   # a kill in the middle of a line
    append_manifest(tmp_path, record(1, "ok", total=3.0))
    records = read_manifest(tmp_path)
    assert [(r.index, r.status) for r in records] == [(1, "failed"), (1, "ok")]
    assert latest_by_index(records)[1].times_s["total"] == 3.0
    assert read_manifest(tmp_path / "nowhere") == []


def test_temp_files_are_recognised_and_removed(tmp_path):
    temps = [".0001-x-seed1.1a2b3c4d.tmp.mp4", ".clip.deadbeef.tmp.png", ".v.0badf00d.tmp.json",
             ".summary.12345678.tmp.json"]
    keeps = ["v.mp4", "v.json", "v.png", ".hidden", "tmp.mp4", "v.json.tmp-1234"]
    for name in temps + keeps:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_temp_files(tmp_path)) == sorted(temps)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keeps)


def test_summary_math():
    entries = [PromptEntry(1, "a", "A"), PromptEntry(2, "b", "A"), PromptEntry(3, "c", "B"),
               PromptEntry(4, "d", "B"), PromptEntry(5, "e", "B")]
    records = [record(1, "failed", "A", reason="old failure"),
               record(1, "ok", "A", total=10.0, denoise=4.0, steps=2),     # latest wins
               record(2, "ok", "A", total=6.0, denoise=3.0, steps=4),
               record(3, "failed", "B", reason="caption service: HTTP 422"),
               record(4, "ok", "B", total=5.0, denoise=1.0, steps=2),
               record(9, "ok", "B", total=100.0, denoise=50.0, steps=2)]   # not selected
    s = summarize(entries, records, {"run_id": "r"})
    assert (s["prompts"], s["ok"], s["failed"], s["pending"]) == (5, 3, 1, 1)
    assert s["total_s"] == pytest.approx(21.0) and s["mean_s"] == pytest.approx(7.0)
    assert s["mean_step_s"] == pytest.approx((4 + 3 + 1) / (2 + 4 + 2))
    a, b = s["per_category"]["A"], s["per_category"]["B"]
    assert (a["ok"], a["failed"], a["total_s"], a["mean_s"]) == (2, 0, 16.0, 8.0)
    assert a["mean_step_s"] == pytest.approx(7 / 6, abs=1e-4)
    assert (b["prompts"], b["ok"], b["failed"], b["pending"], b["mean_s"]) == (3, 1, 1, 1, 5.0)
    assert s["failures"] == [{"index": 3, "category": "B", "reason": "caption service: HTTP 422"}]
    assert s["run"] == {"run_id": "r"}
    empty = summarize(entries[:1], [])
    assert empty["mean_s"] is None and empty["mean_step_s"] is None and empty["pending"] == 1


def test_benchmark_parser_has_no_required_prompt(tmp_path):
    opts, req = parse_benchmark_args(["--model_dir", "m", "--suite", "stepvideo-mini",
                                      "--lines", "3-4", "--limit", "1", "--infer_steps", "3",
                                      "--seed", "5", "--seed_mode", "line",
                                      "--save_path", str(tmp_path)])
    assert (opts.suite, opts.lines, opts.limit, opts.seed_mode) == ("stepvideo-mini", "3-4", 1,
                                                                     "line")
    assert (req.infer_steps, req.seed, req.save_path) == (3, 5, str(tmp_path))
    for bad in (["--prompt", "x"], ["--limit", "0"], ["--seed_mod", "line"]):
        with pytest.raises(SystemExit):
            parse_benchmark_args(["--model_dir", "m", *bad])
    assert "--prompts" in build_benchmark_parser().format_help()


def test_gallery_render_escapes_and_counts(tmp_path):
    report = load_report()
    (tmp_path / "0001-a").mkdir()
    (tmp_path / "0001-a" / "v.mp4").write_bytes(b"x")
    ok = ManifestRecord(1, "A & <B>", "<script>alert(1)</script>", 3, "ok",
                        outputs={"video": "0001-a/v.mp4", "sidecar": "0001-a/v.json"},
                        times_s={"total": 1.5})
    gone = ManifestRecord(2, "A & <B>", "p2", 3, "ok", outputs={"video": "0002-a/v.mp4"})
    for r in (ok, gone, ManifestRecord(3, "C", "p3", 3, "failed", reason="HTTP 500")):
        append_manifest(tmp_path, r)
    page = Path(report.write_gallery(tmp_path)).read_text(encoding="utf-8")
    assert page.count('<div class="card"') == 1
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page
    assert "HTTP 500" in page and "http://" not in page and "https://" not in page


def load_report():
    spec = importlib.util.spec_from_file_location("benchmark_report", ROOT / "benchmark" /
                                                  "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# End to end: service + torchrun + kill + resume + gallery
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> str:
    return tiny_model_dir


@pytest.fixture(scope="module")
def service(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("service") / "server.log"
    with running_service(tiny_dir, "--threads", "8", log=log) as (_, url):
        yield url.removeprefix("http://")


def bench_cmd(tiny_dir: str, url: str, save: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), str(SCRIPT), "--model_dir", tiny_dir,
            "--vae_url", url, "--caption_url", url, "--ulysses_degree", str(nproc),
            "--save_path", str(save), *SIZE, *extra]


def bench_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_bench(cmd: list[str], log: Path, timeout: float = 240) -> str:
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=bench_env(),
                              timeout=timeout, start_new_session=True)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{text}"
    return text


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_groups(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's process group and each worker's group: nothing gets to clean up."""
    groups = {proc.pid}
    for pid in descendants(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            continue
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.1)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def finished_videos(folder: Path, pattern: str = "*/*.mp4") -> list[Path]:
    """Files matching ``pattern`` that are not temporary (pathlib's glob matches dot files)."""
    return sorted(p for p in folder.glob(pattern) if not is_temp_file(p.name))


def prompt_ok(save: Path, index: int, prompt: str) -> tuple[bool, str]:
    """The test's own check of one prompt's directory: exactly one mp4 + one sidecar that
    parses, names the mp4 and agrees with its frame count."""
    from stepvideo.video_io import read_video_info

    d = save / SELECTED[index]
    mp4s, jsons = finished_videos(d, "*.mp4"), finished_videos(d, "*.json")
    if len(mp4s) != 1 or len(jsons) != 1:
        return False, f"{d}: {len(mp4s)} mp4 and {len(jsons)} json files"
    try:
        side = json.loads(jsons[0].read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return False, f"{jsons[0]} does not parse: {e}"
    if Path(side["outputs"]["video"]).name != mp4s[0].name or side["prompt"] != prompt:
        return False, f"{jsons[0]} does not describe {mp4s[0].name}"
    frames = read_video_info(str(mp4s[0]))["frames"]
    if not frames == side["frames"] == 17:
        return False, f"{mp4s[0]}: {frames} frames, sidecar {side['frames']}"
    return True, ""


def wait_for_first_prompt(proc: subprocess.Popen, save: Path, log: Path, timeout: float = 180):
    """Until the first prompt is complete (its manifest line follows its outputs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_manifest(save):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n"
                        f"{log.read_text(errors='replace')}")
        time.sleep(0.02)
    kill_groups(proc)
    pytest.fail(f"no finished prompt after {timeout} s:\n{log.read_text(errors='replace')}")


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp)})


@needs_eval
def test_kill_and_resume_then_gallery(tiny_dir, service, tmp_path, capsys):
    save = tmp_path / "results"
    prompts = dict(read_prompts(EVAL_TXT))
    cmd = bench_cmd(tiny_dir, service, save, "--prompts", str(EVAL_TXT),
                    "--categories", str(EVAL_CATS), "--lines", LINES[0], "--limit", str(LINES[1]))

    first_log = tmp_path / "first.log"
    with open(first_log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=bench_env(), start_new_session=True)
    try:
        wait_for_first_prompt(proc, save, first_log)
        assert proc.poll() is None, "the run finished before the kill"
    finally:
        kill_groups(proc)

    # What the manifest calls done survived the kill; at most the prompt in flight is lost.
    done_at_kill = [i for i in SELECTED if prompt_ok(save, i, prompts[i])[0]]
    assert 12 in done_at_kill and len(done_at_kill) < len(SELECTED)
    for r in latest_by_index(read_manifest(save)).values():
        assert r.status == "ok" and prompt_ok(save, r.index, prompts[r.index])[0]

    # More damage of the kinds a kill leaves: a torn manifest line, temporary files of
    # interrupted atomic writes, and a finished video cut short (it must be redone).
    broken = finished_videos(save / SELECTED[12], "*.mp4")[0]
    broken.write_bytes(broken.read_bytes()[:2000])
    with open(save / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write('{"index": 13, "status": "o')
    for name in SELECTED.values():
        (save / name).mkdir(exist_ok=True)
        (save / name / ".clip-seed1.0123abcd.tmp.mp4").write_bytes(b"partial")
        (save / name / ".clip-seed1.4242abcd.tmp.json").write_text("{")

    text = run_bench(cmd, tmp_path / "rerun.log")
    kept = len(done_at_kill) - 1
    assert f"{kept} already done, {len(SELECTED) - kept} to run" in text, text
    assert "line 12: redoing (" in text and "unreadable" in text

    for index, prompt in prompts.items():
        if index in SELECTED:
            ok, why = prompt_ok(save, index, prompt)
            assert ok, why
    assert sorted(p.name for p in save.iterdir() if p.is_dir()) == sorted(SELECTED.values())
    leftovers = [p for p in save.rglob("*") if "tmp" in p.name]
    assert not leftovers, f"temporary files left: {leftovers}"

    latest = latest_by_index(read_manifest(save))
    assert sorted(latest) == sorted(SELECTED)
    for index, r in latest.items():
        mp4 = finished_videos(save / SELECTED[index], "*.mp4")[0]
        assert r.status == "ok" and r.category == ("Sports" if index == 12 else "Food")
        assert r.outputs["video"] == f"{SELECTED[index]}/{mp4.name}"
        assert (save / r.outputs["sidecar"]).is_file()
        assert (save / r.outputs["contact_sheet"]).is_file()
        assert r.steps == 2 and r.times_s["denoise"] > 0 and r.times_s["total"] > 0
    summary = json.loads((save / "summary.json").read_text(encoding="utf-8"))
    assert (summary["ok"], summary["failed"], summary["pending"]) == (3, 0, 0)
    assert summary["per_category"]["Food"]["ok"] == 2 and summary["mean_step_s"] > 0
    assert summary["run"]["skipped"] == kept and summary["run"]["generated"] == 3 - kept

    check_gallery(save, tmp_path, capsys, expected_cards=3)


def check_gallery(save: Path, tmp_path: Path, capsys, expected_cards: int) -> None:
    index = save / "index.html"
    assert index.is_file()
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (Debian package 'chromium'; scripts/test.sh installs "
                    "it): the gallery was written but not rendered")
    shot = tmp_path / "gallery.png"
    res = chromium("--screenshot=" + str(shot), "--window-size=1200,900", index.as_uri(),
                   tmp=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 10_000, res.stderr[-2000:]
    dom = chromium("--dump-dom", index.as_uri(), tmp=tmp_path).stdout
    cards = re.findall(r'<div class="card"[^>]*>', dom)
    assert len(cards) == expected_cards == len(finished_videos(save)), dom[:2000]
    assert len(re.findall(r"<video ", dom)) == expected_cards
    assert re.search(r'<button data-filter="\*" class="active">', dom), "filter script did not run"
    with capsys.disabled():
        print(f"\ngallery screenshot: {shot}")


def test_failed_prompt_is_recorded_and_run_continues(tiny_dir, service, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a paper boat drifts down a rainy street\n" + "x" * 20_001 + "\n",
                       encoding="utf-8")
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps({"categories": [{"name": "Boats", "first_line": 1,
                                                "last_line": 1}]}), encoding="utf-8")
    save = tmp_path / "results"
    text = run_bench(bench_cmd(tiny_dir, service, save, "--prompts", str(prompts),
                               "--categories", str(cats), "--seed_mode", "line"),
                     tmp_path / "run.log")
    latest = latest_by_index(read_manifest(save))
    assert latest[1].status == "ok" and latest[1].category == "Boats"
    assert latest[2].status == "failed" and latest[2].category == UNCATEGORIZED
    assert "caption" in latest[2].reason and "422" in latest[2].reason
    assert latest[2].seed == latest[1].seed + 1
    summary = json.loads((save / "summary.json").read_text(encoding="utf-8"))
    assert (summary["ok"], summary["failed"]) == (1, 1)
    assert summary["failures"][0]["index"] == 2 and "FAILED" in text
    page = (save / "index.html").read_text(encoding="utf-8")
    assert page.count('<div class="card"') == 1 and "Failed (1)" in page


def test_rerun_compares_the_settings_that_change_the_video(tmp_path):
    """A suite rerun keeps a video only when the sampling, caching and --quantize flags match."""
    from stepvideo.suite import PromptEntry
    from stepvideo.suite_runner import make_jobs, parse_benchmark_args

    _, base = parse_benchmark_args(["--model_dir", str(tmp_path), "--prompts", str(tmp_path / "p"),
                                    "--quantize", "fp8_weight", "--cache", "teacache",
                                    "--cache_threshold", "0.2"])
    entry = PromptEntry(index=1, prompt="a kite", category="uncategorized")
    expected = make_jobs(base, [entry], "same")[0].expected()
    assert expected["quantize"] == "fp8_weight"
    assert expected["cache"] == "teacache" and expected["cache_threshold"] == 0.2
    assert expected["prompt"] == "a kite" and "infer_steps" in expected
