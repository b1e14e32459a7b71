"""Make the README's pictures in ``assets/``.

    python benchmark/make_assets.py                        # runs scripts/demo.sh in a temp dir
    python benchmark/make_assets.py --demo_dir outputs/demo  # reuse an existing demo run

1. ``assets/demo_contact_sheet.png``: the contact sheet of ``scripts/demo.sh`` (the tiny model's
   video, 8 frames), copied from ``<demo_dir>/videos/*.png``.
2. ``assets/e2e_stages_cpu.png``: the stage chart of ``benchmark/perf/e2e_bench.py`` (CPU).

Each PNG is kept under --max_kb: re-saved optimised, then palette-quantised, then downscaled.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.sh"
E2E = ROOT / "benchmark" / "perf" / "e2e_bench.py"


def free_port_pair() -> int:
    """A port p with p and p + 1 free (demo.sh uses p for the service, p + 1 for torchrun)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535 and port_free(port + 1):
            return port
    raise RuntimeError("found no two consecutive free ports on 127.0.0.1")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_checked(cmd: list[str], what: str, env: dict | None = None) -> None:
    """Run ``cmd`` from the repo root, streaming its output; RuntimeError if it fails."""
    print(f"$ {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {done.returncode} (its output is above)")


def run_demo(demo_dir: Path) -> None:
    env = {**os.environ, "DEMO_DIR": str(demo_dir), "DEMO_PORT": str(free_port_pair())}
    run_checked(["bash", str(DEMO)], "scripts/demo.sh", env)


def find_contact_sheet(demo_dir: Path) -> Path:
    sheets = sorted((demo_dir / "videos").glob("*.png"), key=lambda p: p.stat().st_mtime)
    if not sheets:
        raise RuntimeError(f"no contact sheet (*.png) in {demo_dir / 'videos'}; is {demo_dir} "
                           "a scripts/demo.sh output directory (DEMO_DIR)?")
    return sheets[-1]


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_small_png(src: Path, dst: Path, max_bytes: int) -> tuple[int, tuple[int, int]]:
    """Copy ``src`` to ``dst`` as a PNG under ``max_bytes``; returns (bytes, size)."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    data = png_bytes(img)
    if len(data) > max_bytes:
        img = img.quantize(colors=256)
        data = png_bytes(img)
    while len(data) > max_bytes:
        if min(img.size) < 64:
            raise RuntimeError(f"{src} does not fit in {max_bytes} bytes even at {img.size}")
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.NEAREST)
        data = png_bytes(img)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    return len(data), img.size


def demo_sheet(args, assets: Path, max_bytes: int) -> Path:
    dst = assets / "demo_contact_sheet.png"
    if args.demo_dir:
        src = find_contact_sheet(Path(args.demo_dir))
        report_png(src, dst, save_small_png(src, dst, max_bytes))
        return dst
    with tempfile.TemporaryDirectory(prefix="make_assets-demo-") as tmp:
        run_demo(Path(tmp).resolve())
        src = find_contact_sheet(Path(tmp))
        report_png(src, dst, save_small_png(src, dst, max_bytes))
    return dst


def stage_chart(args, assets: Path, max_bytes: int) -> Path:
    dst = assets / "e2e_stages_cpu.png"
    with tempfile.TemporaryDirectory(prefix="make_assets-e2e-") as tmp:
        raw = Path(tmp) / "e2e_stages_cpu.png"
        cmd = [sys.executable, str(E2E), "--device", "cpu", "--repeats", str(args.repeats),
               "--png", str(raw)]
        if args.bench_json:
            cmd += ["--json", str(Path(args.bench_json).resolve())]  # we run from the repo root
        run_checked(cmd, "benchmark/perf/e2e_bench.py")
        report_png(raw, dst, save_small_png(raw, dst, max_bytes))
    return dst


def report_png(src: Path, dst: Path, result: tuple[int, tuple[int, int]]) -> None:
    size, (w, h) = result
    print(f"wrote {dst} ({w}x{h}, {size / 1024:.0f} KB) from {src}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo_dir", default="", help="an existing scripts/demo.sh output (DEMO_DIR); "
                                                  "default: run the demo in a temp dir")
    p.add_argument("--assets", default=str(ROOT / "assets"), help="output directory")
    p.add_argument("--max_kb", type=int, default=300, help="largest PNG written, in KB")
    p.add_argument("--repeats", type=int, default=5, help="e2e_bench --repeats")
    p.add_argument("--bench_json", default="", help="also keep e2e_bench's JSON here")
    p.add_argument("--skip_demo", action="store_true", help="only the stage chart")
    p.add_argument("--skip_bench", action="store_true", help="only the demo contact sheet")
    args = p.parse_args(argv)
    if args.demo_dir and not Path(args.demo_dir).is_dir():
        p.error(f"--demo_dir {args.demo_dir} is not a directory")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    assets, max_bytes = Path(args.assets), args.max_kb * 1024
    try:
        if not args.skip_demo:
            demo_sheet(args, assets, max_bytes)
        if not args.skip_bench:
            stage_chart(args, assets, max_bytes)
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
