"""Where one full-width DiT block spends its time, and what it copies (issue 13), on any device.

One ``DiTConfig(num_layers=1)`` block (48 heads x 128 = 6144, random weights) at --tokens video
tokens x --batch samples with --text-len context tokens:
  time     median wall time of --repeats forwards after one warm-up
  profile  torch.profiler of one forward: aten ops by self time, their share, and the share of
           each category (gemm, attention, copy / layout, other element-wise work)
  copies   every copy op (``stepvideo.memtrack.COPY_OPS``: ``.contiguous()``, a non-view ``reshape``,
           ``cat``, casts) with its calls, bytes written and the ``stepvideo`` line that issued it,
           and the bytes all ops write (a proxy for the element-wise memory traffic)

    python benchmark/perf/block_profile.py --label after --json benchmark/results/cpu_block_profile.json

The JSON keeps one entry per --label, so a before/after pair lives in one file. On the CPU the op
times are fp32 CPU kernels: the copy counts and bytes carry over to a GPU, the time shares do not
(``benchmark/gpu_speed.py`` profiles the CUDA kernels).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from stepvideo.devices import resolve_dtype
from stepvideo.memtrack import COPY_OPS, OpCensus
from stepvideo.modules.model import DiTConfig
from stepvideo.synthetic import block_inputs, random_model
from stepvideo.timing import device_name, sync, time_call

CATEGORIES = (  # first match wins, on aten op names
    ("attention", r"attention|sdpa|flash"),
    ("gemm", r"\bmm\b|addmm|bmm|matmul|linear"),
    ("copy / layout", "|".join(COPY_OPS) + r"|contiguous|transpose|permute"),
    ("norm / rope / modulate / gates (element-wise)", r"."),
)


def categorize(op: str) -> str:
    return next(c for c, pat in CATEGORIES if re.search(pat, op))


def op_table(prof, top: int) -> dict:
    """aten ops by self CPU time (ops nested in an aten op count only their own time)."""
    rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()
            if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    total = sum(us for _, us, _ in rows) or 1.0
    shares: dict[str, float] = {}
    for name, us, _ in rows:
        shares[categorize(name)] = shares.get(categorize(name), 0.0) + us / total
    rows.sort(key=lambda r: -r[1])
    by_category = dict(sorted(shares.items(), key=lambda kv: -kv[1]))
    return {"total_ms": total / 1e3, "by_category": by_category,
            "by_category_ms": {c: share * total / 1e3 for c, share in by_category.items()},
            "top": [{"op": n, "ms": us / 1e3, "share": us / total, "calls": c,
                     "category": categorize(n)} for n, us, c in rows[:top]]}


def census(run) -> dict:
    with torch.inference_mode(), OpCensus() as c:
        run()
    sites = sorted(c.copy_sites.items(), key=lambda kv: -kv[1]["bytes"])
    return {"copies": c.copies, "copy_bytes": c.copy_bytes,
            "bytes_written_all_ops": sum(c.written.values()),
            "copy_sites": [{"site": s, **v} for s, v in sites],
            "ops": dict(sorted(c.ops.items(), key=lambda kv: -kv[1]))}


def report(result: dict) -> None:
    p, c = result["profile"], result["census"]
    print(f"\nblock forward: median {result['median_ms']:.1f} ms over {len(result['times_s'])} "
          f"(profiled aten self time {p['total_ms']:.1f} ms)")
    print("by category: " + ", ".join(f"{k} {100 * v:.1f}% ({p['by_category_ms'][k]:.0f} ms)"
                                      for k, v in p["by_category"].items()))
    print(f"\n{'aten op':42} {'self ms':>9} {'share':>7} {'calls':>6}  category")
    for r in p["top"]:
        print(f"{r['op'][:42]:42} {r['ms']:9.2f} {100 * r['share']:6.1f}% {r['calls']:6d}  "
              f"{r['category']}")
    gib = 2 ** 30
    print(f"\ncopies per block: {c['copies']} ops, {c['copy_bytes'] / gib:.3f} GiB written "
          f"(all ops write {c['bytes_written_all_ops'] / gib:.3f} GiB)")
    for s in c["copy_sites"]:
        print(f"  {s['calls']:4d} x {s['bytes'] / 2 ** 20:10.1f} MiB  {s['site']}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--tokens", type=int, default=1024, help="video tokens per sample")
    p.add_argument("--batch", type=int, default=2, help="samples (2 = one CFG step)")
    p.add_argument("--text-len", type=int, default=256, help="context tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=20, help="ops listed")
    p.add_argument("--label", default="current", help="the entry of --json this run writes")
    p.add_argument("--json", default="", help="add this run to that file under --label")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    args = parse_args(argv)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    cfg = DiTConfig(num_layers=1)
    model = random_model(cfg, device, dtype, seed=0)
    block = model.transformer_blocks[0]
    x, context, t_mod, rope, kv_lens = block_inputs(cfg, args.batch, args.tokens, args.text_len,
                                                    device, dtype)

    def run():
        return block(x, context, t_mod, rope, kv_lens, model.plan, args.tokens)

    times = time_call(run, device, 1, args.repeats)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=acts) as prof:
        run()
        sync(device)
    result = {"device": device_name(device), "dtype": args.dtype, "torch": torch.__version__,
              "batch": args.batch, "tokens": args.tokens, "text_len": args.text_len,
              "dim": cfg.inner_dim, "times_s": times, "median_ms": 1e3 * statistics.median(times),
              "profile": op_table(prof, args.top), "census": census(run)}
    print(f"device {result['device']} | {args.dtype} | torch {torch.__version__} | "
          f"batch {args.batch} x {args.tokens} tokens, text {args.text_len}")
    report(result)
    if args.json:
        path = Path(args.json)
        entries = json.loads(path.read_text()) if path.is_file() else {}
        entries[args.label] = result
        path.write_text(json.dumps(entries, indent=1) + "\n")
        print(f"\nwrote {path} [{args.label}]")
    return result


if __name__ == "__main__":
    main()
