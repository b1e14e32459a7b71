"""The official checkpoint layout (SPEC section 1): every folder and file name, in one table.

    <model_dir>/model_index.json
                scheduler/scheduler_config.json
                transformer/config.json + diffusion_pytorch_model-*.safetensors + their index
                step_llm/config.json + model-*.safetensors + their index + step1_chat_tokenizer.model
                hunyuan_clip/clip_text_encoder/{config.json, pytorch_model.bin}
                hunyuan_clip/tokenizer/{vocab.txt, tokenizer_config.json, special_tokens_map.json}
                vae/vae_v2.safetensors (+ config.json when the widths are not the release's)

The loaders, the downloader, the service and the tiny writer take their names from here. A part is
found from a model root or from the part folder itself by :func:`part_dir`, and :func:`missing_files`
is the one completeness check: the loaders run it before reading weights (:func:`check_part`) and
``python -m stepvideo.download DIR --check`` runs it over several parts (:func:`check_model_dir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from .weights import CheckpointError, index_shards, missing_shards

MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
STEP1_TOKENIZER = "step1_chat_tokenizer.model"
CLIP_ENCODER_DIR = "clip_text_encoder"
CLIP_TOKENIZER_DIR = "tokenizer"
CLIP_VOCAB = "vocab.txt"
CLIP_TOKENIZER_CONFIG = "tokenizer_config.json"
CLIP_SPECIAL_TOKENS_MAP = "special_tokens_map.json"


@dataclass(frozen=True)
class Part:
    """One folder of a model directory. Paths are relative to the folder."""

    folder: str                       # relative to the model root
    files: tuple[str, ...] = ()       # required besides the weights (configs, tokenizers)
    weights: tuple[str, ...] = ()     # alternatives, preferred first; the first is the release's.
    #                                   An ``*.index.json`` also needs every shard it lists.
    config: str | None = None         # the config file (in ``files`` unless optional)
    shard_name: str | None = None     # format of written shards, ``{i}``/``{n}`` 1-based
    download: tuple[str, ...] = ("*",)  # snapshot_download allow patterns

    @property
    def index(self) -> str | None:
        return next((w for w in self.weights if w.endswith(".index.json")), None)

    @property
    def single(self) -> str | None:
        """The one-file checkpoint, the alternative to a shard index."""
        return next((w for w in self.weights if not w.endswith(".index.json")), None)


TRANSFORMER = Part("transformer", files=(CONFIG,), config=CONFIG,
                   weights=("diffusion_pytorch_model.safetensors.index.json",
                            "diffusion_pytorch_model.safetensors"),
                   shard_name="diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors")
SCHEDULER = Part("scheduler", files=(SCHEDULER_CONFIG,), config=SCHEDULER_CONFIG)
STEP_LLM = Part("step_llm", files=(CONFIG, STEP1_TOKENIZER), config=CONFIG,
                weights=("model.safetensors.index.json", "model.safetensors"),
                shard_name="model-{i:05d}-of-{n:05d}.safetensors")
HUNYUAN_CLIP = Part("hunyuan_clip",
                    files=(f"{CLIP_ENCODER_DIR}/{CONFIG}", f"{CLIP_TOKENIZER_DIR}/{CLIP_VOCAB}"),
                    config=f"{CLIP_ENCODER_DIR}/{CONFIG}",
                    weights=(f"{CLIP_ENCODER_DIR}/pytorch_model.bin",
                             f"{CLIP_ENCODER_DIR}/model.safetensors"))
# The release has no vae/config.json: it is optional (written when the widths differ) and the v1
# VAE (vae/vae.safetensors) is not downloaded.
VAE = Part("vae", weights=("vae_v2.safetensors",), config=CONFIG,
           download=("vae_v2.safetensors", CONFIG))
VAE_V1_WEIGHTS = "vae.safetensors"   # the version-1 VAE: neither used nor downloaded
LIB_FOLDER = "lib"                   # the release's proprietary attention library: not needed

PARTS: Mapping[str, Part] = {p.folder: p for p in (TRANSFORMER, SCHEDULER, STEP_LLM,
                                                    HUNYUAN_CLIP, VAE)}


def get_part(name: str) -> Part:
    if name not in PARTS:
        raise ValueError(f"unknown part {name!r}; choose from {list(PARTS)}")
    return PARTS[name]


# --------------------------------------------------------------------------------------------
# Finding a part and checking it
# --------------------------------------------------------------------------------------------

def part_dir(part: Part, path: str) -> str:
    """The folder of ``part``: ``path/<folder>`` when ``path`` is a model root holding one, else
    ``path`` itself (the part folder, whatever its name)."""
    sub = os.path.join(path, part.folder)
    return sub if os.path.isdir(sub) else path


def missing_part_files(part: Part, directory: str) -> list[str]:
    """Paths that the part folder ``directory`` lacks: required files, the weights (the release's
    name when no alternative is present) and every shard a present index lists."""
    missing = [p for p in (os.path.join(directory, f) for f in part.files) if not os.path.isfile(p)]
    present = [w for w in part.weights if os.path.isfile(os.path.join(directory, w))]
    if part.weights and not present:
        missing.append(os.path.join(directory, part.weights[0]))
    elif present and present[0] == part.index:
        missing += missing_shards(os.path.join(directory, part.index))
    return missing


def _weight_files(part: Part, directory: str) -> list[str]:
    """The files a checked part folder's weights are read from: the shards its index lists, else
    the first present alternative."""
    name = next(w for w in part.weights if os.path.isfile(os.path.join(directory, w)))
    path = os.path.join(directory, name)
    return index_shards(path) if name == part.index else [path]


def check_part(part: Part, directory: str) -> list[str]:
    """The loaders' check, before any weight is read: ``directory`` (the part folder) holds every
    file of ``part``; returns its weight files. Otherwise one CheckpointError lists all that is
    missing and how to get it."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{part.folder} directory {directory} does not exist; "
                              f"{fix_hint(_root_of(part, directory))}")
    missing = missing_part_files(part, directory)
    if missing:
        raise CheckpointError(incomplete_message(f"{part.folder} directory {directory} is "
                                                 "incomplete", missing, _root_of(part, directory)))
    return _weight_files(part, directory) if part.weights else []


def part_dirs_for(model_dir: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Folder of each part: ``model_dir/<folder>`` unless ``overrides[name]`` names another (an
    absolute path, or one relative to ``model_dir`` as the release's ``--clip_dir`` flags are)."""
    dirs = {name: os.path.join(model_dir, part.folder) for name, part in PARTS.items()}
    for name, path in (overrides or {}).items():
        get_part(name)
        dirs[name] = path if os.path.isabs(path) else os.path.join(model_dir, path)
    return dirs


def missing_files(model_dir: str, parts: Sequence[str] = tuple(PARTS),
                  part_dirs: Mapping[str, str] | None = None) -> list[str]:
    """Paths a complete directory has and this one lacks, over ``parts``."""
    dirs = part_dirs_for(model_dir, part_dirs)
    return [path for name in parts for path in missing_part_files(get_part(name), dirs[name])]


def check_model_dir(model_dir: str, parts: Sequence[str] = tuple(PARTS),
                    part_dirs: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``{part: folder}`` if every file of ``parts`` is present, else raise one
    CheckpointError listing the missing files and how to get them."""
    missing = missing_files(model_dir, parts, part_dirs)
    if missing:
        raise CheckpointError(incomplete_message(
            f"model directory {model_dir} is incomplete for {', '.join(parts)}", missing, model_dir))
    dirs = part_dirs_for(model_dir, part_dirs)
    return {name: dirs[name] for name in parts}


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

def _root_of(part: Part, directory: str) -> str:
    """The model root a part folder belongs to, for the fix command ("DIR" if it is renamed)."""
    directory = os.path.normpath(directory)
    return os.path.dirname(directory) if os.path.basename(directory) == part.folder else "DIR"


def fix_hint(root: str) -> str:
    return (f"Fix: `python -m stepvideo.download {root}` fetches the weights and resumes a partial "
            f"download (add --turbo for a Turbo directory); for tests and demos "
            f"`python -m stepvideo.tiny {root}` writes a tiny model.")


def incomplete_message(what: str, missing: Sequence[str], root: str, limit: int = 12) -> str:
    """One line: what is incomplete, every missing file (up to ``limit``), the fix."""
    shown = ", ".join(missing[:limit])
    if len(missing) > limit:
        shown += f", ... ({len(missing) - limit} more)"
    return f"{what}: {len(missing)} file(s) missing: {shown}. {fix_hint(root)}"
