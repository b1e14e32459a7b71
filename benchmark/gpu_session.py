"""Every prepared GPU check in one device call, most wanted first, within one time budget.

A session lent a GPU has about 15 minutes of device time in all (machine start included) and at
most 10 minutes per command, which is less than the prepared scripts take together. This runs the
topics named on the command line in that order, each with what is left of ``--budget-s`` (passed on
as the script's own ``--budget-s`` where it has one, and as a hard ``timeout``), writes every
script's JSON and log under ``--out`` (``$OUT`` on the device), and ends with a table and
``session.json``. Exit 1 when a topic failed its checks, timed out or was skipped for time.
``TOPIC:SECONDS`` caps one topic's share (``speed:300 one_gpu``: the speed table gets at most 300 s
and the memory modes the rest), so a later topic is not starved by an earlier one's budget.

Topics (script, issue, typical time on one H200):
  speed     benchmark/gpu_speed.py       issue 13: attention matrix, block, error, profile, step  ~8 min
  one_gpu   benchmark/one_gpu.py         issue 11: one CFG step per memory mode, 80/48/24 GB caps  ~8 min
  vae       benchmark/gpu_vae.py         issue 12: tiled full-size VAE decode, peak and time      ~4 min
  cache     benchmark/perf/cache_quality.py --random_dit   issue 16: step-cache speed            ~6 min

Wheels the device cannot download (``bash scripts/gpu_wheels.sh`` puts them in ``.whl/``; carry it)
are installed into a scratch folder first and put on the scripts' ``PYTHONPATH``.

On the device (one call; ``carry: [".whl"]``):
    python3 benchmark/gpu_session.py --budget-s 540 --out $OUT speed:300 one_gpu
Here, afterwards: copy the JSON files into benchmark/results/ and regenerate the README tables:
    python benchmark/gpu_speed.py --render benchmark/results/h200_speed.json --readme README.md
    python benchmark/one_gpu.py --render benchmark/results/h200_one_gpu.json --readme README.md
CPU smoke test of the same flow at toy sizes: ``python benchmark/gpu_session.py --tiny speed one_gpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"

# topic -> (script, arguments on the GPU, arguments for --tiny on the CPU, needs at least s, has --budget-s)
TOPICS = {
    "speed": ("benchmark/gpu_speed.py", [], ["--tiny"], 120, True),
    "one_gpu": ("benchmark/one_gpu.py", [], ["--tiny"], 120, True),
    "vae": ("benchmark/gpu_vae.py", [], ["--tiny", "--device", "cpu"], 60, False),
    "cache": ("benchmark/perf/cache_quality.py",
              ["--random_dit", "--device", "cuda", "--dtype", "bfloat16", "--num_frames", "17",
               "--setting", "teacache:0.23", "--setting", "teacache:1e9", "--setting",
               "first_block:0.1", "--setting", "cfg_truncate:0.5/4"],
              ["--random_dit", "--device", "cpu", "--layers", "2", "--heads", "1", "--num_frames",
               "17", "--height", "64", "--width", "64", "--infer_steps", "2", "--setting",
               "teacache:1e9"], 120, False),
}
JSON_FLAG = {"vae": "--out"}  # the rest take --json


def install_wheels(site: Path) -> str | None:
    """Carried wheels into ``site`` (no index, no dependencies: the device has no registry)."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return None
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", str(site), *map(str, wheels)], check=True)
    return str(site)


def topic_arg(text: str) -> tuple[str, float | None]:
    """``NAME`` or ``NAME:SECONDS`` (the most this topic may take)."""
    name, _, cap = text.partition(":")
    if name not in TOPICS:
        raise argparse.ArgumentTypeError(f"unknown topic {name!r}; choose from {', '.join(TOPICS)}")
    try:
        seconds = float(cap) if cap else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the cap after ':' must be seconds") from None
    if seconds is not None and seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the cap must be > 0 seconds")
    return name, seconds


def run_topic(name: str, a, left: float, env: dict) -> dict:
    script, gpu_args, tiny_args, needs, has_budget = TOPICS[name]
    out_json = Path(a.out) / f"{'cpu' if a.tiny else 'h200'}_{name}.json"
    cmd = [sys.executable, str(ROOT / script), *(tiny_args if a.tiny else gpu_args),
           JSON_FLAG.get(name, "--json"), str(out_json)]
    if has_budget:
        cmd += ["--budget-s", f"{max(left - 30, 30):.0f}"]  # 30 s for start-up and writing
    row = {"topic": name, "script": script, "json": str(out_json), "command": cmd[1:]}
    if left < needs:
        return dict(row, status="skipped", why=f"{left:.0f} s left, needs {needs} s")
    log = Path(a.out) / f"{name}.log"
    t0 = time.monotonic()
    print(f"== {name}: {' '.join(cmd[1:])} (timeout {left:.0f} s)", flush=True)
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=left)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.monotonic() - t0, 1)
    tail = log.read_text(errors="replace").splitlines()[-3:]
    print("\n".join(f"   {line}" for line in tail), flush=True)
    status = "timed out" if rc is None else "passed" if rc == 0 else f"failed (exit {rc})"
    return dict(row, status=status, seconds=seconds, log=str(log),
                wrote_json=out_json.exists())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="topics: " + ", ".join(TOPICS))
    p.add_argument("topics", nargs="+", type=topic_arg, metavar="TOPIC[:SECONDS]",
                   help="in the order to run them; :SECONDS caps that topic's share")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="seconds for all topics together (a device command may run 600)")
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmark/results/session",
                   help="folder for the JSON reports and logs ($OUT on the device)")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (checks the flow)")
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = dict(os.environ)
    site = None if a.tiny else install_wheels(Path("/tmp/stepvideo-site"))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (site, str(ROOT), env.get("PYTHONPATH")) if x)
    rows = []
    for name, cap in a.topics:
        left = a.budget_s - (time.monotonic() - start)
        rows.append(run_topic(name, a, left if cap is None else min(cap, left), env))
    summary = {"budget_s": a.budget_s, "seconds": round(time.monotonic() - start, 1),
               "wheels": [w.name for w in sorted(WHEELS.glob("*.whl"))] if site else [],
               "topics": rows}
    (Path(a.out) / "session.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'topic':8} {'status':18} {'s':>7}  json")
    for r in rows:
        print(f"{r['topic']:8} {r['status']:18} {r.get('seconds', 0):>7.1f}  "
              f"{r['json'] if r.get('wrote_json') else r.get('why', '-')}")
    print(f"wrote {Path(a.out) / 'session.json'}")
    return 0 if all(r["status"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
