"""Issue 13's speed table in one prepared GPU run (about 7 minutes on one H200).

Stages, in this order; each is skipped with a note when it would overrun --budget-s:
 1. attention  every backend at (B, S, H, D) = (2, 75888, 48, 128) bf16: TFLOP/s and error vs sdpa;
               the cross-attention (397 text keys, masked) time; parity with fp32 CPU sdpa at small
               shapes (no mask, text mask, fewer keys than queries); what ``auto`` picks.
 2. block      one full-width block per mode (exact eager / compiled, fp8 linears, 8-bit =
               fp8 linears + sage attention, fp8_weight storage): time, TFLOP/s, fraction of
               peak, peak memory, output cosine vs exact eager.
 3. error      a full-width --err-layers model, CFG batch 2, --err-steps Euler steps at CFG 9 on
               random weights: per-layer cosine (first forward) and final-latent cosine vs bf16 sdpa.
 4. profile    torch.profiler of one block (eager, compiled) and of a 2-layer whole forward:
               top kernels, their share of GPU time, and shares by category.
 5. step       the whole 48-layer DiT, one CFG step (75,888 tokens x batch 2): exact (auto, compiled)
               and 8-bit (fp8 + sage, compiled); when the block times say a step won't fit in what
               is left of the budget, it is skipped and projected as 48 x the block time.
Exit 1 when a check fails: an exact backend off sdpa by more than bf16 rounding, the exact step
under 70% of the bf16 peak, the 8-bit step under 1.4x the exact one, or an 8-bit final-latent cosine
under 0.99. Modes or backends that are not installed are reported as such, not failed.

On the H200 (no registry there: carry torchao and sageattention as wheels, see scripts/gpu_wheels.sh):
    python3 benchmark/gpu_speed.py --json $OUT/h200_speed.json
Here, afterwards: the README table from the saved JSON (no GPU needed):
    python benchmark/gpu_speed.py --render benchmark/results/h200_speed.json --readme README.md
Only what a first run skipped for time (a step without the block stage runs unconditionally):
    python3 benchmark/gpu_speed.py --stages step --json $OUT/h200_step.json
Logic smoke test at toy size on the CPU (fp32, no compile):
    python benchmark/gpu_speed.py --tiny --json /tmp/speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from stepvideo import flops, quant, synthetic
from stepvideo.diffusion.scheduler import cfg_combine, euler_step, flow_sigmas
from stepvideo.modules import attention as attn
from stepvideo.modules.model import DiTConfig
from stepvideo.synthetic import model_inputs, random_model, token_grid
from stepvideo.timing import (device_name, markers, peak_memory_gb, replace_block, reset_peak_memory,
                              sync, time_call)

EXACT_STEP_FRACTION = 0.70  # of the bf16 peak: <= 30.8 s on an H200
EIGHT_BIT_SPEEDUP = 1.4
EIGHT_BIT_COSINE = 0.99
EXACT_ATTN_MAX_ABS = 2e-2  # bf16 rounding of an attention output (gpu_check's limit)
README_BLOCK = "speed-table"
README_BEGIN, README_END = markers(README_BLOCK)


@dataclass(frozen=True)
class Mode:
    name: str
    attn: str  # an attention backend name or "auto"
    quantize: str  # a stepvideo.quant mode
    compile: bool
    eight_bit: bool = False


MODES = (
    Mode("exact eager", "auto", "none", False),
    Mode("exact compiled", "auto", "none", True),
    Mode("fp8 linears", "auto", "fp8", True, True),
    Mode("8-bit (fp8 + sage)", "sage", "fp8", True, True),
    Mode("fp8_weight storage", "auto", "fp8_weight", False),
)
EXACT, EIGHT_BIT = MODES[1], MODES[3]  # the two whole-step modes


class Run:
    """Shapes, device, the time budget and what has been measured so far."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.device = torch.device(a.device)
        self.dtype = torch.float32 if a.tiny else torch.bfloat16
        heads = 2 if a.tiny else 48
        self.cfg = DiTConfig(num_attention_heads=heads, num_layers=a.layers,
                             caption_channels=(64, 32) if a.tiny else (6144, 1024))
        self.tokens, self.batch, self.text_len = a.tokens, 2, a.text_len
        self.compile = not a.no_compile
        self.peak = flops.device_peak(device_name(self.device)) if self.device.type == "cuda" else None
        self.start = time.monotonic()
        self.report = {"device": device_name(self.device), "torch": torch.__version__,
                       "dtype": str(self.dtype), "peak_bf16_tflops": self.peak,
                       "shape": {"batch": 2, "tokens": a.tokens, "heads": heads, "head_dim": 128,
                                 "text_len": a.text_len, "layers": a.layers},
                       "packages": package_versions(), "stages": {}, "checks": [], "notes": []}

    def left(self) -> float:
        return self.a.budget_s - (time.monotonic() - self.start)

    def check(self, name: str, ok: bool | None, **values) -> None:
        row = {"check": name, "ok": ok, **values}
        self.report["checks"].append(row)
        print(f"check {'PASS' if ok else 'n/a ' if ok is None else 'FAIL'} {name}: "
              f"{json.dumps(values, default=str)}", flush=True)

    def mode_missing(self, mode: Mode) -> str | None:
        if mode.attn != "auto" and (why := attn.BACKENDS[mode.attn].missing()):
            return why
        try:
            quant.check_mode(mode.quantize, self.device)
        except (RuntimeError, ValueError) as e:
            return str(e)
        return None


def package_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "triton", "torchao", "sageattention", "flash-attn", "flash-attn-4"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return quant.error_stats(a, b)["cosine"]


def median_time(fn, run: Run, warmup: int = 1, repeats: int | None = None) -> float:
    return statistics.median(time_call(fn, run.device, warmup, repeats or run.a.repeats))


def free(run: Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def build(run: Run, mode: Mode, layers: int):
    """A seeded random model of ``layers`` blocks, quantized and compiled for ``mode``."""
    attn.set_backend(mode.attn)
    model = random_model(dataclasses.replace(run.cfg, num_layers=layers), run.device, run.dtype,
                         seed=0)
    quant.quantize_dit(model, mode.quantize)
    if mode.compile and run.compile:  # --no-compile runs the compiled modes eagerly
        model.compile_blocks()
    return model


# --- 1. attention -------------------------------------------------------------------------------

def attention_stage(run: Run) -> dict:
    b, s, h, d = run.batch, run.tokens, run.cfg.num_attention_heads, 128
    g = torch.Generator(device=run.device).manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device=run.device, dtype=run.dtype, generator=g)
               for _ in range(3))
    kt, vt = (torch.randn(b, run.text_len, h, d, device=run.device, dtype=run.dtype, generator=g)
              for _ in range(2))
    lens = torch.tensor([run.text_len, run.text_len * 2 // 3], device=run.device)
    with torch.inference_mode():
        ref = attn.BACKENDS["sdpa"].fn(q, k, v, None)
    count = 4 * b * s * s * h * d
    rows = []
    for name, backend in attn.BACKENDS.items():
        why = backend.missing() or backend.refuse_inputs(q)
        if why:
            rows.append({"backend": name, "exact": backend.exact, "status": f"not run: {why}"})
            continue
        row = {"backend": name, "exact": backend.exact}
        try:
            with torch.inference_mode():
                out = backend.fn(q, k, v, None)
                row["max_abs_err_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
                row["cosine_vs_sdpa"] = cosine(out, ref)
                del out
                t = median_time(lambda: backend.fn(q, k, v, None), run)
                row.update(ms=t * 1e3, tflops=count / t / 1e12,
                           fraction_of_peak=count / t / 1e12 / run.peak if run.peak else None)
                row["cross_ms"] = median_time(lambda: backend.fn(q, kt, vt, lens), run) * 1e3
            row["parity"] = small_parity(name, run.device, 40 if run.a.tiny else 300)
            row["status"] = "ok"
        except Exception as e:  # one backend failing at the real shape is a row, not the end
            row.update(status=f"failed: {type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        print(f"attention {name:6}: {row.get('ms', float('nan')):9.2f} ms "
              f"{row.get('tflops', float('nan')):7.1f} TFLOP/s  {row['status']}", flush=True)
        free(run)
    for row in rows:
        if row.get("status") == "ok" and row["exact"]:
            worst = max([row["max_abs_err_vs_sdpa"]] + [p["max_abs_err"] for p in row["parity"]])
            run.check(f"attention {row['backend']} matches sdpa", worst <= EXACT_ATTN_MAX_ABS,
                      max_abs_err=worst, limit=EXACT_ATTN_MAX_ABS)
    result = {"flops": count, "rows": rows}
    attn.set_backend("sdpa")  # is PyTorch's own choice FlashAttention-2 or already cuDNN?
    result["sdpa_dispatch"] = {"self": attn.kernel_name(q, k, v),
                               "cross (masked)": attn.kernel_name(q, kt, vt, lens)}
    print(f"sdpa dispatches to {result['sdpa_dispatch']}", flush=True)
    attn.set_backend("auto")
    attn.clear_auto_cache()
    with torch.inference_mode():
        chosen = attn.auto_choice(q, k, v, None)
    result["auto"] = {"choice": chosen, "timings": next(iter(attn.AUTO_TIMINGS.values()), None)}
    timed = {r["backend"]: r["ms"] for r in rows if r.get("status") == "ok" and r["exact"]
             and attn.BACKENDS[r["backend"]].auto}
    if len(timed) > 1 and run.device.type == "cuda":  # on the CPU auto is sdpa by design
        best = min(timed.values())
        run.check("auto picks the fastest exact backend", timed.get(chosen, 1e30) <= 1.1 * best,
                  choice=chosen, choice_ms=timed.get(chosen), best_ms=best)
    return result


def small_parity(name: str, device: torch.device, n: int = 300) -> list[dict]:
    """``name`` against fp32 CPU sdpa: no mask, the text mask, fewer keys (uneven Ulysses)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 4, 128, generator=g) for _ in range(3))
    cases = {"no mask": (k, v, None), "text mask": (k, v, torch.tensor([n, n * 2 // 5])),
             "fewer keys": (k[:, :n * 9 // 10], v[:, :n * 9 // 10], None)}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    out = []
    for case, (kk, vv, lens) in cases.items():
        ref = attn.BACKENDS["sdpa"].fn(q, kk, vv, lens)
        with torch.inference_mode():
            got = attn.BACKENDS[name].fn(*(t.to(device, dtype) for t in (q, kk, vv)),
                                         None if lens is None else lens.to(device))
        out.append({"case": case, "max_abs_err": (got.float().cpu() - ref).abs().max().item()})
    return out


# --- 2. one block ------------------------------------------------------------------------------

def block_inputs(run: Run) -> tuple:
    return synthetic.block_inputs(run.cfg, run.batch, run.tokens, run.text_len, run.device,
                                  run.dtype)


def block_stage(run: Run) -> dict:
    x, context, t_mod, rope, kv_lens = block_inputs(run)
    count = flops.block_flops(run.cfg, run.batch, run.tokens, run.text_len)
    rows, ref = [], None
    for mode in MODES:
        if why := run.mode_missing(mode):
            rows.append({"mode": mode.name, "status": f"not run: {why}"})
            continue
        row = {"mode": mode.name}
        try:
            model = build(run, mode, 1)
            block = model.transformer_blocks[0]

            def fn():
                return block(x, context, t_mod, rope, kv_lens, model.plan, run.tokens)

            reset_peak_memory(run.device)
            t = median_time(fn, run, warmup=2 if mode.compile else 1)
            with torch.inference_mode():
                out = fn()
            _, mem = peak_memory_gb(run.device)
            ref = out if ref is None and mode.name == "exact eager" else ref
            row.update(ms=t * 1e3, tflops=count / t / 1e12, peak_memory_gb=mem,
                       fraction_of_peak=count / t / 1e12 / run.peak if run.peak else None,
                       cosine_vs_exact=cosine(out, ref) if ref is not None else None,
                       attention=attn.auto_choices() if mode.attn == "auto" else mode.attn,
                       status="ok" if run.compile or not mode.compile else "ok (ran eagerly: "
                                                                           "--no-compile)")
            del model, block, out
        except Exception as e:
            row.update(status=f"failed: {type(e).__name__}: {str(e)[:300]}",
                       trace=traceback.format_exc()[-1500:])
        rows.append(row)
        print(f"block {mode.name:20}: {row.get('ms', float('nan')):9.2f} ms "
              f"{row.get('tflops', float('nan')):7.1f} TFLOP/s  {row['status']}", flush=True)
        free(run)
    return {"flops": count, "rows": rows}


# --- 3. profile ----------------------------------------------------------------------------------

CATEGORIES = (  # first match wins; names of CUDA kernels (or CPU ops on the CPU)
    ("attention", r"flash|fmha|attention|attn|sdpa|sage|flex"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|scaled_mm|\bmm\b|addmm|matmul|linear|sm90_"),
    ("compiled fusions (norms, RoPE, modulation, gates)", r"^triton_"),
    ("copy / cast / layout", r"copy|memcpy|CatArray|aten::cat|clone|contiguous|transpose|permute"),
    ("norm / rope / modulate / other elementwise", r"."),
)


def categorize(name: str) -> str:
    return next(c for c, pat in CATEGORIES if re.search(pat, name, re.IGNORECASE))


def kernel_table(prof, on_cuda: bool, top: int = 15) -> dict:
    """Kernels (CPU: ops) by self time: the top ones and the share of each category."""
    rows = []
    for e in prof.key_averages():
        if on_cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
                continue
            us = e.self_device_time_total
        else:
            if e.self_cpu_time_total <= 0 or not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        rows.append((e.key, us, e.count))
    total = sum(us for _, us, _ in rows) or 1.0
    shares: dict[str, float] = {}
    for name, us, _ in rows:
        shares[categorize(name)] = shares.get(categorize(name), 0.0) + us / total
    rows.sort(key=lambda r: -r[1])
    return {"total_ms": total / 1e3, "by_category": dict(sorted(shares.items(), key=lambda x: -x[1])),
            "top": [{"kernel": n[:120], "ms": us / 1e3, "share": us / total, "calls": c,
                     "category": categorize(n)} for n, us, c in rows[:top]]}


def profile_stage(run: Run) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    x, context, t_mod, rope, kv_lens = block_inputs(run)
    out = {}
    for mode in (MODES[0], MODES[1]):
        if why := run.mode_missing(mode):
            out[f"block, {mode.name}"] = {"status": f"not run: {why}"}
            continue
        model = build(run, mode, 1)
        block = model.transformer_blocks[0]
        with torch.inference_mode():
            for _ in range(2):  # warm-up (and compile)
                block(x, context, t_mod, rope, kv_lens, model.plan, run.tokens)
            sync(run.device)
            with profile(activities=acts) as prof:
                block(x, context, t_mod, rope, kv_lens, model.plan, run.tokens)
                sync(run.device)
        out[f"block, {mode.name}"] = kernel_table(prof, run.device.type == "cuda")
        del model, block
        free(run)
    model = build(run, MODES[0], 2)
    inputs = model_inputs(model.config, run.batch, token_grid(run.tokens), run.text_len, 77 if not
                          run.a.tiny else 8, run.device, run.dtype, seed=3)
    with torch.inference_mode():
        model(**inputs)
        sync(run.device)
        with profile(activities=acts) as prof:
            model(**inputs)
            sync(run.device)
    out["whole forward, 2 layers, exact eager"] = kernel_table(prof, run.device.type == "cuda")
    del model
    free(run)
    for name, table in out.items():
        if "by_category" in table:
            print(f"profile {name}: " + ", ".join(f"{c} {100 * s:.1f}%"
                                                   for c, s in table["by_category"].items()))
    return out


# --- 4. error after N steps ------------------------------------------------------------------------

def denoise(run: Run, mode: Mode, inputs: dict, x0: torch.Tensor) -> tuple[list, torch.Tensor]:
    """N CFG Euler steps from ``x0``; the block outputs of the first forward and the final latents."""
    model = build(run, dataclasses.replace(mode, compile=False), run.a.err_layers)
    layers = []
    hooks = [blk.register_forward_hook(lambda m, i, o: layers.append(o.to('cpu', torch.float32, copy=True))
                                       if len(layers) < len(model.transformer_blocks) else None)
             for blk in model.transformer_blocks]
    sigmas = flow_sigmas(run.a.err_steps, 13.0)
    x = x0
    with torch.inference_mode():
        for i in range(run.a.err_steps):
            t = sigmas[i].to(run.device).expand(2)
            v = model(x.expand(2, *x.shape[1:]).to(run.dtype), t, **inputs, return_dict=False)
            x = euler_step(x, cfg_combine(v[:1], v[1:], 9.0), sigmas[i], sigmas[i + 1])
    for h in hooks:
        h.remove()
    del model
    free(run)
    return layers, x.float().cpu()


def error_stage(run: Run) -> dict:
    cfg = run.cfg
    grid = (1, 8, 8) if run.a.tiny else (4, 32, 32)
    inputs = model_inputs(cfg, 2, grid, run.text_len, 8 if run.a.tiny else 77, run.device,
                          run.dtype, seed=4)
    x0 = inputs.pop("hidden_states")[:1].float()
    inputs.pop("timestep")
    inputs["encoder_attention_mask"][1, run.text_len * 2 // 3:] = 0  # a shorter negative prompt
    ref_mode = Mode("reference: bf16 sdpa", "sdpa", "none", False)
    ref_layers, ref_x = denoise(run, ref_mode, inputs, x0)
    modes = [Mode(f"exact, attention {n}", n, "none", False) for n in attn.BACKENDS
             if n != "sdpa" and attn.BACKENDS[n].exact]
    modes += [Mode("8-bit attention (sage)", "sage", "none", False, True)]
    modes += [m for m in MODES if m.quantize != "none"]
    rows = []
    for mode in modes:
        if why := run.mode_missing(dataclasses.replace(mode, compile=False)):
            rows.append({"mode": mode.name, "status": f"not run: {why}"})
            continue
        try:
            layers, x = denoise(run, mode, inputs, x0)
            row = {"mode": mode.name, "eight_bit": mode.eight_bit, "status": "ok",
                   "per_layer_cosine": [cosine(a, b) for a, b in zip(layers, ref_layers)],
                   "final_latent_cosine": cosine(x, ref_x)}
        except Exception as e:
            row = {"mode": mode.name, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(f"error {mode.name:28}: final-latent cosine {row.get('final_latent_cosine', '-')}  "
              f"{row['status']}", flush=True)
        if row["status"] == "ok" and (mode.eight_bit or mode.quantize == "none"):
            run.check(f"final-latent cosine, {mode.name}",
                      row["final_latent_cosine"] >= EIGHT_BIT_COSINE,
                      cosine=row["final_latent_cosine"], limit=EIGHT_BIT_COSINE)
    return {"layers": run.a.err_layers, "grid": list(grid), "steps": run.a.err_steps,
            "cfg_scale": 9.0, "reference": ref_mode.name, "rows": rows}


# --- 5. the whole step ----------------------------------------------------------------------------

def projected(run: Run, block_ms: float | None) -> float | None:
    """A whole step from one block's time: the blocks are all but ~0.1% of the FLOPs."""
    return None if block_ms is None else run.cfg.num_layers * block_ms / 1e3


def step_stage(run: Run) -> dict:
    grid = token_grid(run.tokens)
    count = flops.dit_forward_flops(run.cfg, run.batch, run.tokens, run.text_len)
    blocks = {r["mode"]: r for r in run.report["stages"].get("block", {}).get("rows", [])}
    rows, outs = [], {}
    for mode in (EXACT, EIGHT_BIT):
        if why := run.mode_missing(mode):
            rows.append({"mode": mode.name, "status": f"not run: {why}"})
            continue
        block_ms = blocks.get(mode.name, {}).get("ms")
        estimate = ((1 + run.a.step_repeats) * run.cfg.num_layers * (block_ms or 0) / 1e3
                    + (60 if mode.compile and run.compile else 10))
        if block_ms is not None and estimate > run.left():  # no block time: asked for, so run
            rows.append({"mode": mode.name, "projected_s": projected(run, block_ms),
                         "status": f"skipped: estimated {estimate:.0f} s, "
                                   f"{run.left():.0f} s of the budget left"})
            continue
        row = {"mode": mode.name}
        try:
            model = build(run, mode, run.cfg.num_layers)
            inputs = model_inputs(model.config, run.batch, grid, run.text_len,
                                  8 if run.a.tiny else 77, run.device, run.dtype, seed=5)
            reset_peak_memory(run.device)
            with torch.inference_mode():  # the warm-up (compiles) gives the output to compare
                outs[mode.name] = model(**inputs, return_dict=False).float().cpu()
            t = median_time(lambda: model(**inputs, return_dict=False), run, warmup=0,
                            repeats=run.a.step_repeats)
            _, mem = peak_memory_gb(run.device)
            row.update(s=t, tflops=count / t / 1e12, peak_memory_gb=mem, status="ok",
                       fraction_of_peak=count / t / 1e12 / run.peak if run.peak else None)
            del model
        except Exception as e:
            row.update(status=f"failed: {type(e).__name__}: {str(e)[:300]}",
                       trace=traceback.format_exc()[-1500:])
        rows.append(row)
        print(f"step {mode.name:20}: {row.get('s', float('nan')):8.2f} s  {row['status']}", flush=True)
        free(run)
    by = {r["mode"]: r for r in rows}
    exact, eight = by.get(EXACT.name, {}), by.get(EIGHT_BIT.name, {})
    if exact.get("status") == "ok" and run.peak:
        run.check("exact whole step >= 70% of bf16 peak", exact["fraction_of_peak"] >= EXACT_STEP_FRACTION,
                  s=exact["s"], fraction=exact["fraction_of_peak"],
                  target_s=count / (EXACT_STEP_FRACTION * run.peak * 1e12))
    if exact.get("status") == "ok" and eight.get("status") == "ok":
        eight["speedup_vs_exact"] = exact["s"] / eight["s"]
        eight["output_cosine_vs_exact"] = cosine(outs[EIGHT_BIT.name], outs[EXACT.name])
        if run.peak:
            run.check("8-bit whole step >= 1.4x exact", eight["speedup_vs_exact"] >= EIGHT_BIT_SPEEDUP,
                      speedup=eight["speedup_vs_exact"], limit=EIGHT_BIT_SPEEDUP)
    return {"flops": count, "grid": list(grid), "rows": rows}


# --- the table ----------------------------------------------------------------------------------

def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def _step_cell(row: dict) -> str:
    if row.get("s") is not None:
        return f"{row['s']:.2f}"
    if row.get("projected_s") is not None:
        return f"~{row['projected_s']:.1f} (projected: layers x block)"
    return ""


def render_table(report: dict) -> str:
    """The README's markdown for a saved report."""
    st, lines = report["stages"], []
    sh = report["shape"]
    lines.append(f"Device {report['device']}, torch {report['torch']}, "
                 f"{sh['tokens']:,} tokens x batch {sh['batch']}, {sh['heads']} heads x 128; "
                 f"packages {', '.join(f'{k} {v}' for k, v in report['packages'].items() if v)}.\n")
    if "attention" in st:
        a = st["attention"]
        lines += ["| attention backend | exact | self-attn ms | TFLOP/s | % of peak | cross-attn ms | "
                  "max abs err vs sdpa | status |", "|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            lines.append(f"| {r['backend']} | {'yes' if r['exact'] else 'no (8-bit)'} | "
                         f"{_f(r.get('ms'), '.1f')} | {_f(r.get('tflops'), '.0f')} | "
                         f"{_f(r.get('fraction_of_peak') and 100 * r['fraction_of_peak'], '.1f')} | "
                         f"{_f(r.get('cross_ms'), '.2f')} | {_f(r.get('max_abs_err_vs_sdpa'), '.2g')} | "
                         f"{r['status']} |")
        lines.append(f"\n`auto` chose **{a['auto']['choice']}**; plain `sdpa` dispatches to "
                     f"{a.get('sdpa_dispatch')}.\n")
    err = {r["mode"]: r for r in st.get("error", {}).get("rows", [])}
    step = {r["mode"]: r for r in st.get("step", {}).get("rows", [])}
    mode_rows = st.get("block", {}).get("rows") or st.get("step", {}).get("rows") or []
    if mode_rows:
        lines += ["| mode | block ms | block TFLOP/s | % of peak | block peak GiB | block cosine | "
                  "whole step s | step % of peak | step peak GiB | final-latent cosine | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mode_rows:
            s, e = step.get(r["mode"], {}), err.get(r["mode"], {})
            lines.append(
                f"| {r['mode']} | {_f(r.get('ms'), '.1f')} | {_f(r.get('tflops'), '.0f')} | "
                f"{_f(r.get('fraction_of_peak') and 100 * r['fraction_of_peak'], '.1f')} | "
                f"{_f(r.get('peak_memory_gb'), '.1f')} | {_f(r.get('cosine_vs_exact'), '.5f')} | "
                f"{_step_cell(s)} | "
                f"{_f(s.get('fraction_of_peak') and 100 * s['fraction_of_peak'], '.1f')} | "
                f"{_f(s.get('peak_memory_gb'), '.1f')} | {_f(e.get('final_latent_cosine'), '.4f')} | "
                f"{r['status']} |")
    eight = step.get(EIGHT_BIT.name, {})
    if eight.get("speedup_vs_exact"):
        lines.append(f"\n8-bit whole step: {eight['speedup_vs_exact']:.2f}x the exact step; its output's "
                     f"cosine to the exact step's {eight['output_cosine_vs_exact']:.4f}.")
    if err:
        e0 = st["error"]
        lines += [f"\nError vs {e0['reference']} ({e0['layers']} full-width layers, grid "
                  f"{e0['grid']}, {e0['steps']} Euler steps at CFG {e0['cfg_scale']}, random weights):\n",
                  "| mode | min per-layer cosine (1st forward) | final-latent cosine | status |",
                  "|---|---|---|---|"]
        for r in err.values():
            pl = r.get("per_layer_cosine")
            lines.append(f"| {r['mode']} | {_f(min(pl) if pl else None, '.5f')} | "
                         f"{_f(r.get('final_latent_cosine'), '.5f')} | {r['status']} |")
    lines += [f"\nNote: {n}" for n in report.get("notes", [])]
    checks = report["checks"]
    if checks:
        lines.append("\nTargets and checks: " + "; ".join(
            f"{c['check']}: {'met' if c['ok'] else 'n/a' if c['ok'] is None else 'NOT met'}"
            for c in checks) + ".")
    return "\n".join(lines)


def failed_checks(report: dict) -> list[str]:
    return [c["check"] for c in report["checks"] if c["ok"] is False]


# --- main ---------------------------------------------------------------------------------------

STAGES = {"attention": attention_stage, "block": block_stage, "error": error_stage,
          "profile": profile_stage, "step": step_stage}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes in fp32 (logic check on the CPU)")
    p.add_argument("--tokens", type=int, default=None, help="video tokens per sample (75888)")
    p.add_argument("--text-len", type=int, default=None, help="context tokens (397)")
    p.add_argument("--layers", type=int, default=None, help="layers of the whole step (48)")
    p.add_argument("--err-layers", type=int, default=None, help="layers of the error run (8)")
    p.add_argument("--err-steps", type=int, default=8, help="Euler steps of the error run")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (attention, block)")
    p.add_argument("--step-repeats", type=int, default=1, help="timed whole steps after 1 warm-up")
    p.add_argument("--no-compile", action="store_true", help="run the compiled modes eagerly")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip what would overrun this")
    p.add_argument("--json", default="", help="write the report here")
    p.add_argument("--readme", default="", help="rewrite this README's speed-table block")
    p.add_argument("--render", default="", help="only render a saved --json report (no GPU)")
    a = p.parse_args(argv)
    big = dict(tokens=75888, text_len=397, layers=48, err_layers=8)
    small = dict(tokens=64, text_len=12, layers=2, err_layers=2)
    for k, v in (small if a.tiny else big).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.tiny:
        a.no_compile = True
    if a.device == "cuda" and not torch.cuda.is_available() and not a.render:
        p.error("--device cuda but torch.cuda.is_available() is False (use --tiny on the CPU)")
    unknown = set(a.stages.split(",")) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.render:
        report = json.loads(Path(a.render).read_text())
    else:
        run = Run(a)
        report = run.report
        for knob in ("recompile_limit", "cache_size_limit"):  # fp8 / sage / exact blocks: 3+ graphs
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        print(f"device {report['device']} | torch {torch.__version__} | packages "
              f"{report['packages']} | budget {a.budget_s:.0f} s", flush=True)
        for name in a.stages.split(","):
            if run.left() <= 0:
                report["notes"].append(f"stage {name} skipped: time budget spent")
                continue
            t0 = time.monotonic()
            try:
                report["stages"][name] = STAGES[name](run)
            except Exception as e:  # a broken stage is recorded and the next one still runs
                report["stages"][name] = {"error": f"{type(e).__name__}: {e}",
                                          "trace": traceback.format_exc()[-2000:]}
                run.check(f"stage {name} ran", False, error=f"{type(e).__name__}: {e}")
            report["stages"].get(name, {})["seconds"] = time.monotonic() - t0
            print(f"stage {name}: {time.monotonic() - t0:.1f} s, {run.left():.0f} s left", flush=True)
            if a.json:  # after every stage: a run killed at its time limit keeps what it measured
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(report, indent=1, default=str))
        if a.json:
            print(f"wrote {a.json}")
    table = render_table(report)
    print("\n" + table)
    if a.readme:
        replace_block(a.readme, README_BLOCK, table)
        print(f"updated {a.readme}")
    failed = failed_checks(report)
    print(f"{len(report['checks'])} checks, {len(failed)} failed: {failed}" if failed else
          f"{len(report['checks'])} checks, none failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
