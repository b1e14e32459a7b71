"""End-to-end benchmark on the tiny model: the time of each stage of one video, through the real
caption/VAE service, next to the same caption/VAE work done in-process (the HTTP overhead).

    python benchmark/perf/e2e_bench.py                       # CPU, 17 frames 128x128, 8 steps
    python benchmark/perf/e2e_bench.py --device cuda --json benchmark/results/e2e_cuda.json

Steps: write the tiny model to a temp dir (or use --model_dir), start ``api/call_remote_server.py``
on a free 127.0.0.1 port (embedding cache off, so every caption call really encodes), wait for
/health, load the DiT once, then time each stage (--warmup untimed calls, median of --repeats):

  caption_service  RemoteTextEncoder.encode([prompt + pos_magic, neg_magic])   (HTTP round trip)
  caption_local    LocalTextEncoder.encode of the same prompts, same dirs and dtype, this process
  denoise          stepvideo.diffusion.video_pipeline.denoise: the CFG Euler loop over the DiT
  vae_service      RemoteVAE.decode_uint8(latents)                              (HTTP round trip)
  vae_local        LocalVAE.decode_uint8 of the same latents, this process
  write            save_video (mp4) + contact_sheet (png) into a temp dir

Prints a table, writes --json and a horizontal bar chart (--png, drawn with Pillow). The service
is stopped at the end whatever happens. --device moves only the DiT; the service stays on
--service_device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SERVER = ROOT / "api" / "call_remote_server.py"

from stepvideo.devices import DTYPE_CHOICES, dtype_name, resolve_dtype  # noqa: E402
from stepvideo.parallel import free_port  # noqa: E402
from stepvideo.diffusion.video_pipeline import (NEG_MAGIC, POS_MAGIC, PRESETS,  # noqa: E402
                                                StepVideoPipeline, VideoSize)
from stepvideo.service.client import RemoteTextEncoder, ServiceError  # noqa: E402
from stepvideo.text_encoder.local import LocalTextEncoder
from stepvideo.timing import device_name, sync  # noqa: E402
from stepvideo.vae.local import LocalVAE  # noqa: E402

DEFAULT_PROMPT = "A red fox trots across a snowy field at sunrise / 一只红狐狸在日出时穿过雪原"
# (key, label, kind) in table/chart order; kind picks the bar colour.
STAGES = [
    ("caption_service", "caption: service round trip", "service"),
    ("caption_local", "caption: in-process", "local"),
    ("denoise", "denoise loop (DiT)", "dit"),
    ("vae_service", "VAE decode: service round trip", "service"),
    ("vae_local", "VAE decode: in-process", "local"),
    ("write", "write mp4 + contact sheet", "write"),
]
E2E_KEYS = ("caption_service", "denoise", "vae_service", "write")


# --- the service subprocess -------------------------------------------------------------------

class Service:
    """``api/call_remote_server.py`` as a subprocess on 127.0.0.1; ``stop`` always ends it."""

    def __init__(self, model_dir: str, device: str, dtype: str, log_path: Path):
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, str(SERVER), "--model_dir", model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--device", device, "--dtype", dtype, "--cache_size", "0"]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /health says ready; RuntimeError if it exits, fails or times out."""
        client, start = RemoteTextEncoder(self.url), time.perf_counter()
        deadline, last = start + timeout, None
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with code {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                last = client.health()
            except ServiceError as e:
                last = str(e)
            status = last.get("status") if isinstance(last, dict) else None
            if status == "ready":
                return time.perf_counter() - start
            if status == "failed":
                raise RuntimeError(f"the service failed to load its models: {last}")
            time.sleep(0.2)
        raise RuntimeError(f"the service was not ready after {timeout:.0f} s (last /health: "
                           f"{last}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --- timing -----------------------------------------------------------------------------------

def time_stage(fn, warmup: int, repeats: int, device: torch.device = torch.device("cpu")):
    """(times, last result): ``warmup`` untimed calls, then ``repeats`` timed ones."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times}


def timed_once(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# --- the stages -------------------------------------------------------------------------------

def run_stages(args, model_dir: str, service: Service, work: Path, setup: dict) -> dict:
    """Load the DiT and the in-process encoders/VAE, then time every stage of the pipeline: one
    pipeline over the service and one in-process, sharing the DiT."""
    from stepvideo.diffusion.scheduler import load_scheduler
    from stepvideo.modules.model import StepVideoModel

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    service_dtype = resolve_dtype(args.service_dtype)
    root = Path(model_dir)
    setup["load_transformer"], model = timed_once(
        lambda: StepVideoModel.from_pretrained(model_dir, dtype, device))
    setup["load_local_text_encoder"], local_text = timed_once(lambda: LocalTextEncoder.from_dirs(
        str(root / "step_llm"), str(root / "hunyuan_clip"), service_dtype, "cpu", cache_size=0))
    setup["load_local_vae"], local_vae = timed_once(
        lambda: LocalVAE.from_dir(str(root / "vae"), service_dtype, "cpu"))
    remote = StepVideoPipeline(model, load_scheduler(model_dir)).setup_api(service.url, service.url)
    local = StepVideoPipeline(model, load_scheduler(model_dir), local_text, local_vae)

    size = VideoSize.rounded(args.num_frames, args.height, args.width)
    preset = PRESETS["base"]
    w, r = args.warmup, args.repeats
    stages, outputs = {}, {}

    def encode(pipe):
        return pipe.encode_prompt([args.prompt], args.pos_magic, args.neg_magic)

    times, text = time_stage(lambda: encode(remote), w, r)
    stages["caption_service"] = summary(times)
    stages["caption_local"] = summary(time_stage(lambda: encode(local), w, r)[0])

    def run_denoise():
        return remote.sample(text, size, args.infer_steps, preset.guidance_scale,
                             preset.time_shift, seed=args.seed, progress=False)

    times, x = time_stage(run_denoise, w, r, device)
    stages["denoise"] = summary(times)
    stages["denoise"]["step_mean_s"] = stages["denoise"]["median_s"] / args.infer_steps

    times, video = time_stage(lambda: remote.decode_uint8(x), w, r)
    stages["vae_service"] = summary(times)
    stages["vae_local"] = summary(time_stage(lambda: local.decode_uint8(x), w, r)[0])

    stem = str(work / "video")
    stages["write"] = summary(time_stage(lambda: remote.write(video, stem), w, r)[0])
    outputs.update(frames=int(video.shape[1]), height=int(video.shape[2]),
                   width=int(video.shape[3]), dit_dtype=dtype_name(dtype))
    return {"stages": stages, "video": outputs}


def derived(stages: dict) -> dict:
    med = {k: v["median_s"] for k, v in stages.items()}
    return {
        "end_to_end_via_service_s": sum(med[k] for k in E2E_KEYS),
        "end_to_end_in_process_s": med["caption_local"] + med["denoise"] + med["vae_local"]
                                   + med["write"],
        "caption_http_overhead_s": med["caption_service"] - med["caption_local"],
        "vae_http_overhead_s": med["vae_service"] - med["vae_local"],
    }


# --- reporting --------------------------------------------------------------------------------

def settings_line(report: dict) -> str:
    a = report["args"]
    return (f"{a['num_frames']} frames {a['width']}x{a['height']}, {a['infer_steps']} steps, "
            f"seed {a['seed']}, median of {a['repeats']} after {a['warmup']} warm-up")


def device_line(report: dict) -> str:
    v, a = report["video"], report["args"]
    return (f"DiT: {report['device']} {v['dit_dtype']} | service: {a['service_device']} "
            f"{a['service_dtype']} | torch {report['torch']}")


def print_table(report: dict) -> None:
    stages, d = report["stages"], report["derived"]
    print(f"\n{device_line(report)}\n{settings_line(report)}")
    print(f"{'stage':<32} {'median s':>9} {'min s':>9} {'max s':>9}")
    for key, label, _ in STAGES:
        s = stages[key]
        print(f"{label:<32} {s['median_s']:9.4f} {s['min_s']:9.4f} {s['max_s']:9.4f}")
    print(f"{'  denoise, per step':<32} {stages['denoise']['step_mean_s']:9.4f}")
    print(f"{'caption HTTP overhead':<32} {d['caption_http_overhead_s']:9.4f}")
    print(f"{'VAE HTTP overhead':<32} {d['vae_http_overhead_s']:9.4f}")
    print(f"{'end to end via the service':<32} {d['end_to_end_via_service_s']:9.4f}")
    print(f"{'end to end in-process':<32} {d['end_to_end_in_process_s']:9.4f}")
    print("one-off: " + ", ".join(f"{k} {v:.2f} s" for k, v in report["setup_s"].items()))


COLORS = {"service": (52, 120, 198), "local": (120, 180, 230), "dit": (222, 120, 40),
          "write": (130, 130, 130), "total": (40, 40, 40)}


def chart_rows(report: dict) -> list[tuple[str, float, str]]:
    rows = [(label, report["stages"][key]["median_s"], kind) for key, label, kind in STAGES]
    rows.append(("end to end via the service", report["derived"]["end_to_end_via_service_s"],
                 "total"))
    return rows


def draw_chart(report: dict, path: str) -> str:
    """A horizontal bar chart of the stage medians, PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    rows = chart_rows(report)
    font, title_font = ImageFont.load_default(size=14), ImageFont.load_default(size=16)
    width, label_w, bar_h, gap, top, right = 900, 250, 22, 10, 74, 90
    height = top + len(rows) * (bar_h + gap) + 34
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    title = f"Step-Video tiny model, one video: time per stage ({settings_line(report)})"
    draw.text((12, 10), title, fill="black", font=title_font)
    draw.text((12, 34), device_line(report), fill=(60, 60, 60), font=font)
    scale = (width - label_w - right) / max(v for _, v, _ in rows)
    for i, (label, value, kind) in enumerate(rows):
        y = top + i * (bar_h + gap)
        draw.text((label_w - 10, y + bar_h / 2), label, fill="black", font=font, anchor="rm")
        x1 = label_w + max(1, round(value * scale))
        draw.rectangle([label_w, y, x1, y + bar_h], fill=COLORS[kind])
        draw.text((x1 + 6, y + bar_h / 2), f"{value:.3f} s", fill="black", font=font, anchor="lm")
    axis_y = top + len(rows) * (bar_h + gap)
    draw.line([label_w, top - 4, label_w, axis_y], fill="black")
    draw.text((label_w, axis_y + 8), "seconds (median wall time); blue = through the HTTP "
              "service, light blue = same work in-process", fill=(60, 60, 60), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    return path


# --- main -------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", default="", help="a model dir (default: write the tiny model "
                                                   "to a temp dir)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the DiT's device")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="the DiT's dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--service_device", default="cpu", help="the service's --device")
    p.add_argument("--service_dtype", default="bfloat16", choices=DTYPE_CHOICES[1:],
                   help="the service's --dtype, also used by the in-process encoders/VAE")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--pos_magic", default=POS_MAGIC)
    p.add_argument("--neg_magic", default=NEG_MAGIC)
    p.add_argument("--num_frames", type=int, default=17)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--infer_steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per stage")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per stage (median)")
    p.add_argument("--ready_timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--png", default=str(ROOT / "benchmark" / "results" / "e2e_stages_cpu.png"),
                   help="bar chart of the stage medians ('' for none)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.repeats < 1 or args.warmup < 0 or args.infer_steps < 1:
        p.error("--repeats and --infer_steps must be >= 1 and --warmup >= 0")
    if args.model_dir and not Path(args.model_dir, "model_index.json").is_file():
        p.error(f"--model_dir {args.model_dir} has no model_index.json; write the tiny model with "
                "`python -m stepvideo.tiny DIR` or leave --model_dir out")
    return args


def prepare_model(args, tmp: Path, setup: dict) -> str:
    if args.model_dir:
        return str(Path(args.model_dir).resolve())  # the service runs from the repo root
    from stepvideo.tiny import write_tiny_model

    setup["write_tiny_model"], model_dir = timed_once(
        lambda: write_tiny_model(str(tmp / "tiny-model")))
    return model_dir


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="e2e_bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = prepare_model(args, tmp, setup)
        service = Service(model_dir, args.service_device, args.service_dtype, tmp / "service.log")
        try:
            print(f"service on {service.url} (log {service.log_path})", flush=True)
            setup["service_start_to_ready"] = service.wait_ready(args.ready_timeout)
            (tmp / "out").mkdir()
            result = run_stages(args, model_dir, service, tmp / "out", setup)
        finally:
            service.stop()
    report = {"benchmark": "e2e_stages", "device": device_name(torch.device(args.device)),
              "torch": torch.__version__, "args": vars(args), **result,
              "derived": derived(result["stages"]), "setup_s": setup}
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False))
        print(f"wrote {args.json}")
    if args.png:
        print(f"wrote {draw_chart(report, args.png)}")
    return report


def cli() -> int:
    try:
        main()
    except (RuntimeError, OSError) as e:  # ServiceError is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
