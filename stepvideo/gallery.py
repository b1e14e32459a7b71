"""A static HTML gallery of a benchmark run (``python benchmark/report.py SAVE_PATH`` rebuilds it).

One card per video (the latest ``ok`` manifest record, over ``manifest.jsonl`` and the parts of
sharded runs, of each prompt whose mp4 is still there):
the video, its contact sheet, the prompt, category, seed, settings and per-stage times. A row of
category buttons filters the cards (plain JavaScript, no network resources); failed prompts are
listed below the cards. The page uses relative links, so the folder can be moved or served as is.
The prompt-suite runner (``stepvideo.suite_runner``, ``benchmark/run_benchmark.py``) calls
:func:`write_gallery` at the end of every run.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from .fileio import write_bytes_atomic
from .suite import ManifestRecord, latest_by_index, manifest_files, read_manifest, slug

INDEX = "index.html"
SETTING_KEYS = ("infer_steps", "cfg_scale", "time_shift", "preset", "device", "dtype")
TIME_KEYS = ("total", "text_encode", "denoise", "denoise_step_mean", "vae_decode", "write")

STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;background:#f4f4f6;color:#222}
h1{font-size:20px;margin:0 0 4px} .meta{color:#555;font-size:13px;margin-bottom:12px}
.filters button{margin:0 6px 6px 0;padding:4px 10px;border:1px solid #888;border-radius:12px;
 background:#fff;cursor:pointer;font-size:13px} .filters button.active{background:#333;color:#fff}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.card{background:#fff;border-radius:8px;padding:10px;box-shadow:0 1px 3px rgba(0,0,0,.15)}
.card video,.card img{width:100%;display:block;background:#000;margin-bottom:6px}
.card .prompt{font-size:14px;margin:6px 0} .card .tag{display:inline-block;background:#e3e8f4;
 border-radius:10px;padding:1px 8px;font-size:12px;margin-right:6px}
.card table{font-size:12px;border-collapse:collapse;width:100%} .card td{padding:1px 4px;
 border-top:1px solid #eee;vertical-align:top} .card td:first-child{color:#666;width:40%}
.failures{margin-top:16px;font-size:13px} .failures li{color:#a00}
[hidden]{display:none!important}
"""

SCRIPT = """
(function(){
  var buttons=document.querySelectorAll('.filters button');
  function show(cat){
    document.querySelectorAll('.card').forEach(function(c){
      c.hidden=!(cat==='*'||c.dataset.category===cat);});
    buttons.forEach(function(b){b.classList.toggle('active',b.dataset.filter===cat);});
    document.getElementById('shown').textContent=
      document.querySelectorAll('.card:not([hidden])').length;
  }
  buttons.forEach(function(b){b.addEventListener('click',function(){show(b.dataset.filter);});});
  show('*');
})();
"""


def load_records(save_path: Path) -> tuple[list[ManifestRecord], list[ManifestRecord]]:
    """(videos, failures): the latest record per prompt, ok ones only if the video exists."""
    latest = sorted(latest_by_index(read_manifest(save_path)).values(), key=lambda r: r.index)
    videos = [r for r in latest
              if r.status == "ok" and (save_path / r.outputs.get("video", "")).is_file()
              and r.outputs.get("video")]
    failures = [r for r in latest if r.status != "ok"]
    return videos, failures


def read_sidecar(save_path: Path, record: ManifestRecord) -> dict:
    path = save_path / record.outputs.get("sidecar", "")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _rows(pairs) -> str:
    return "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in pairs)


def _fmt_time(key: str, value: float) -> str:
    return f"{value:.3f} s" if key == "denoise_step_mean" else f"{value:.2f} s"


def card(save_path: Path, record: ManifestRecord) -> str:
    side = read_sidecar(save_path, record)
    settings = side.get("settings", {})
    video = html.escape(record.outputs["video"], quote=True)
    sheet = record.outputs.get("contact_sheet")
    sheet_html = (f'<img class="sheet" src="{html.escape(sheet, quote=True)}" '
                  f'alt="contact sheet, line {record.index}" loading="lazy">'
                  if sheet and (save_path / sheet).is_file() else "")
    shape = (f"{side['frames']} frames, {side['width']}x{side['height']}"
             if {"frames", "width", "height"} <= side.keys() else "")
    info = [("line", record.index), ("seed", record.seed), ("video", shape)]
    info += [(k, settings[k]) for k in SETTING_KEYS if k in settings]
    degrees = side.get("degrees", {})
    if degrees:
        info.append(("world size", degrees.get("world_size", "")))
    times = [(f"time: {k}", _fmt_time(k, record.times_s[k])) for k in TIME_KEYS
             if k in record.times_s]
    resumed = ' <span class="tag">from an earlier run</span>' if record.resumed else ""
    return (f'<div class="card" data-category="{html.escape(slug(record.category), quote=True)}">'
            f'<video src="{video}" controls loop muted preload="metadata"></video>{sheet_html}'
            f'<span class="tag">{html.escape(record.category)}</span>{resumed}'
            f'<p class="prompt">{html.escape(record.prompt)}</p>'
            f"<table>{_rows(info + times)}</table></div>")


def filters(records: list[ManifestRecord]) -> str:
    cats = list(dict.fromkeys(r.category for r in records))
    buttons = ['<button data-filter="*">all</button>']
    buttons += [f'<button data-filter="{html.escape(slug(c), quote=True)}">'
                f"{html.escape(c)} ({sum(r.category == c for r in records)})</button>"
                for c in cats]
    return f'<div class="filters">{"".join(buttons)}</div>'


def failure_list(failures: list[ManifestRecord]) -> str:
    if not failures:
        return ""
    items = "".join(f"<li>line {r.index} ({html.escape(r.category)}): "
                    f"{html.escape(r.prompt[:80])}: {html.escape(r.reason)}</li>"
                    for r in failures)
    return f'<div class="failures"><h2>Failed ({len(failures)})</h2><ul>{items}</ul></div>'


def summary_line(save_path: Path) -> str:
    try:
        s = json.loads((save_path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return ""
    step = s.get("mean_step_s")
    return (f"{s.get('ok', 0)} ok, {s.get('failed', 0)} failed of {s.get('prompts', 0)} "
            f"selected; total {s.get('total_s', 0):.1f} s"
            + (f"; {step:.3f} s per denoising step" if step is not None else ""))


def render(save_path: Path) -> str:
    videos, failures = load_records(save_path)
    cards = "\n".join(card(save_path, r) for r in videos)
    title = f"Step-Video benchmark: {save_path.resolve().name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            f'<div class="meta"><span id="shown">{len(videos)}</span> of {len(videos)} videos '
            f"shown. {html.escape(summary_line(save_path))}</div>"
            f"{filters(videos)}<div class=\"grid\">\n{cards}\n</div>{failure_list(failures)}"
            f"<script>{SCRIPT}</script></body></html>\n")


def write_gallery(save_path: str | os.PathLike) -> str:
    """Write ``SAVE_PATH/index.html`` (atomically) and return its path."""
    save_path = Path(save_path)
    if not manifest_files(save_path):
        raise FileNotFoundError(f"{save_path} has no manifest.jsonl (or shard parts); run "
                                "benchmark/run_benchmark.py with --save_path there first")
    return str(write_bytes_atomic(save_path / INDEX, render(save_path).encode("utf-8")))
