"""Fetch the released weights and check that a model directory is complete.

``python -m stepvideo.download DIR`` downloads ``stepfun-ai/stepvideo-t2v`` into DIR with
``huggingface_hub.snapshot_download``, skipping what this package does not use (the proprietary
``lib/*.so`` attention library and the version-1 VAE ``vae/vae.safetensors``). Interrupted downloads
resume: run the same command again.

``--turbo`` makes DIR a complete Turbo model directory: ``transformer/``, ``scheduler/`` and
``model_index.json`` come from ``stepfun-ai/stepvideo-t2v-turbo`` (which holds nothing else), and
``step_llm/``, ``hunyuan_clip/`` and ``vae/`` from the base repository. Every loader, the service
and the runner then take DIR as ``--model_dir`` exactly like a base directory. (Keep base and
Turbo in separate directories: both have a ``transformer/``.)

:func:`check_model_dir` (from :mod:`stepvideo.layout`, where the file names live) is the
completeness check the loaders, the service and the runner share: it lists every missing file and
says how to fix it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import layout
from .layout import check_model_dir, missing_files, part_dirs_for  # noqa: F401 (public here)
from .weights import CheckpointError

BASE_REPO = "stepfun-ai/stepvideo-t2v"
TURBO_REPO = "stepfun-ai/stepvideo-t2v-turbo"

PARTS = tuple(layout.PARTS)          # transformer, scheduler, step_llm, hunyuan_clip, vae
SERVICE_PARTS = tuple(p.folder for p in (layout.STEP_LLM, layout.HUNYUAN_CLIP, layout.VAE))
DIT_PARTS = (layout.TRANSFORMER.folder, layout.SCHEDULER.folder)   # what the DiT ranks load
IGNORE_PATTERNS = (f"{layout.LIB_FOLDER}/*", "*.so", f"{layout.VAE.folder}/{layout.VAE_V1_WEIGHTS}")


@dataclass(frozen=True)
class Fetch:
    """One ``snapshot_download`` call."""

    repo_id: str
    allow_patterns: tuple[str, ...]
    ignore_patterns: tuple[str, ...] = IGNORE_PATTERNS


def download_plan(turbo: bool = False, parts: Sequence[str] = PARTS) -> list[Fetch]:
    """The snapshot_download calls that fill a directory with ``parts`` (pure, no network)."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    dit = [p for p in parts if p in DIT_PARTS]
    rest = [p for p in parts if p not in DIT_PARTS]
    dit_patterns = ((layout.MODEL_INDEX,) if dit else ()) + _patterns(dit)
    if not turbo:
        return [Fetch(BASE_REPO, dit_patterns + _patterns(rest))]
    plan = [Fetch(TURBO_REPO, dit_patterns)] if dit else []
    return plan + ([Fetch(BASE_REPO, _patterns(rest))] if rest else [])


def _patterns(parts: Iterable[str]) -> tuple[str, ...]:
    return tuple(f"{layout.PARTS[name].folder}/{pattern}" for name in parts
                 for pattern in layout.PARTS[name].download)


def select_files(repo_files: Iterable[str], fetch: Fetch) -> list[str]:
    """The files of ``repo_files`` that ``fetch`` downloads (snapshot_download's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(list(repo_files), allow_patterns=list(fetch.allow_patterns),
                                    ignore_patterns=list(fetch.ignore_patterns)))


def download(directory: str, turbo: bool = False, parts: Sequence[str] = PARTS,
             revision: str | None = None, token: str | None = None, max_workers: int = 8) -> str:
    """Download (or resume) into ``directory``, then run :func:`check_model_dir`."""
    from huggingface_hub import snapshot_download

    for fetch in download_plan(turbo, parts):
        print(f"fetching {fetch.repo_id}: {', '.join(fetch.allow_patterns)}", flush=True)
        snapshot_download(fetch.repo_id, local_dir=directory, revision=revision, token=token,
                          allow_patterns=list(fetch.allow_patterns),
                          ignore_patterns=list(fetch.ignore_patterns), max_workers=max_workers)
    check_model_dir(directory, parts)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stepvideo.download",
        description="Download the Step-Video-T2V weights (resumable) and check the directory. "
                    "Skips lib/*.so and the v1 VAE, which this package does not use.")
    parser.add_argument("directory", help="target model directory")
    parser.add_argument("--turbo", action="store_true",
                        help=f"transformer/ and scheduler/ from {TURBO_REPO}, encoders and VAE "
                             f"from {BASE_REPO}: DIR becomes a complete Turbo directory")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="only these parts (e.g. the service host needs step_llm "
                             "hunyuan_clip vae)")
    parser.add_argument("--revision", default=None, help="a branch, tag or commit of the repos")
    parser.add_argument("--token", default=None,
                        help="Hugging Face token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--check", action="store_true",
                        help="only check that DIR is complete; download nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            check_model_dir(args.directory, args.parts)
        else:
            download(args.directory, args.turbo, args.parts, args.revision, args.token)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from e
    print(f"{args.directory}: complete ({', '.join(args.parts)})")


if __name__ == "__main__":
    main()
