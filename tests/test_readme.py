"""The README's in-process Python example runs as written (on the tiny model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers import ROOT
from stepvideo.video_io import read_video_info


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_in_process_example_runs(tiny_model_dir, tmp_path):
    block = next(b for b in readme_blocks() if "LocalTextEncoder" in b)
    assert 'model_dir = "/data/stepvideo-t2v"' in block
    code = block.replace('model_dir = "/data/stepvideo-t2v"', f"model_dir = {tiny_model_dir!r}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "denoising" in proc.stderr            # the progress bar
    info = read_video_info(str(tmp_path / "kite.mp4"))
    assert (info["frames"], info["width"], info["height"]) == (17, 128, 128)
    assert "text_encode" in proc.stdout and "denoise" in proc.stdout


def test_service_example_names_exist():
    """The service example needs a GPU and the real weights; check that its names import."""
    block = next(b for b in readme_blocks() if "setup_api" in b)
    imports = "\n".join(l for l in block.splitlines() if l.startswith(("import", "from")))
    proc = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
