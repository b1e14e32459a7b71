"""The package as a user installs it: a wheel built from the tree holds the library, the server CLI,
the runners and the assets (no api/, tests/ or benchmark/), builds without setuptools warnings,
installs, and makes a video from outside the checkout with its console scripts and
``torchrun -m stepvideo.runner``. (run_parallel.py's and api/call_remote_server.py's flags are
checked in test_runner.py and test_service.py.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from stepvideo.video_io import read_video_info
from tests.helpers import ROOT, free_port, running_service

SCRIPTS = {"stepvideo-server": "stepvideo.service.cli:main",
           "stepvideo-download": "stepvideo.download:main",
           "stepvideo-tiny": "stepvideo.tiny:main",
           "stepvideo-benchmark": "stepvideo.suite_runner:main"}
SHIPPED = ["stepvideo/service/cli.py", "stepvideo/runner.py", "stepvideo/suite_runner.py",
           "stepvideo/gallery.py", "stepvideo/assets/tiny_corpus.txt",
           "stepvideo/genserver/loop.py", "stepvideo/genserver/page.html",
           "stepvideo/assets/suite_mini.txt", "stepvideo/assets/suite_mini_categories.json"]
# What a build must not see: VCS data, environments, build outputs and run outputs.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "outputs", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".whl", ".devout")


def run(cmd: list, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited with {proc.returncode}:\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """(wheel, build log): ``pip wheel`` on a copy of the tree (an in-tree build would write
    build/ and *.egg-info into the checkout), offline, with this environment's setuptools."""
    major = int(version("setuptools").split(".")[0])
    assert major >= 77, (f"setuptools {version('setuptools')} cannot build pyproject.toml's SPDX "
                         f"license; pip install -e '.[test]' brings setuptools>=77")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    proc = run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                "--no-index", "-w", tmp / "dist", src])
    wheels = list((tmp / "dist").glob("stepvideo-*.whl"))
    assert len(wheels) == 1, proc.stdout[-3000:]
    return wheels[0], proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def site(built, tmp_path_factory) -> Path:
    """The wheel installed without dependencies (they are this environment's) into a folder."""
    target = tmp_path_factory.mktemp("site")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", target,
         built[0]])
    return target


def test_wheel_holds_the_package_and_its_commands(built):
    wheel, log = built
    warned = [line for line in log.splitlines()
              if "would be ignored" in line or "absent from the `packages`" in line]
    assert not warned, "setuptools warned:\n" + "\n".join(warned)
    names = zipfile.ZipFile(wheel).namelist()
    assert set(SHIPPED) <= set(names), sorted(set(SHIPPED) - set(names))
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"stepvideo"}, tops  # no api/, tests/ or benchmark/ package
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    scripts = dict(re.findall(r"^(\S+) = (\S+)$", entry.decode(), re.M))
    assert scripts == SCRIPTS


def test_installed_wheel_makes_a_video_outside_the_checkout(site, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = run([sys.executable, "-c", "import stepvideo; print(stepvideo.__file__)"], env=env,
                cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(site), where
    model = tmp_path / "tiny-model"
    run([site / "bin" / "stepvideo-tiny", model], env=env, cwd=tmp_path)
    assert (model / "model_index.json").is_file()
    with running_service(str(model), env=env, cwd=tmp_path, log=tmp_path / "server.log",
                         command=[str(site / "bin" / "stepvideo-server")]) as (_, url):
        url = url.removeprefix("http://")
        proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                    "--master_addr", "127.0.0.1", "--master_port", free_port(),
                    "-m", "stepvideo.runner", "--model_dir", model, "--vae_url", url,
                    "--caption_url", url, "--prompt", "a paper boat on a pond",
                    "--num_frames", "17", "--height", "64", "--width", "64", "--infer_steps", "2",
                    "--save_path", tmp_path / "videos"], env=env, cwd=tmp_path)
    mp4 = re.search(r"wrote (\S+\.mp4) ", proc.stdout).group(1)
    info = read_video_info(mp4)
    assert (info["frames"], info["width"], info["height"]) == (17, 64, 64)
