"""Checkpoint loading: sharded safetensors with an index, strict key and shape checks.

Every model in the package is built on the meta device and filled here with ``assign=True``,
so no memory is spent on random initialisation and nothing is silently left uninitialised.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open

from .fileio import write_json_atomic


class CheckpointError(RuntimeError):
    """A checkpoint directory or file does not match what the model expects."""


def _short_list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += f", ... ({len(names) - limit} more)"
    return text


def read_json(path: str, what: str) -> dict:
    """Read a JSON file, turning a missing or malformed file into a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: {path} does not exist. Check the model directory "
                              "(download it with `python -m stepvideo.download DIR`).")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({e}); re-download it.") from e


def index_shards(index_path: str) -> list[str]:
    """Paths of the shards a ``*.safetensors.index.json`` lists, beside it, sorted."""
    weight_map = read_json(index_path, "checkpoint index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map'.")
    folder = os.path.dirname(index_path)
    return [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]


def missing_shards(index_path: str) -> list[str]:
    """The shards an index lists that are not on disk."""
    return [p for p in index_shards(index_path) if not os.path.isfile(p)]


def load_safetensors(paths: Iterable[str], dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read and merge safetensors files tensor by tensor; floating tensors are cast to ``dtype``
    as they are read, so host memory holds the loaded state plus one tensor, never a second copy
    of a shard or of the model."""
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                dup = set(f.keys()) & set(state)
                if dup:
                    raise CheckpointError(f"{path} repeats tensors already loaded: {_short_list(dup)}")
                for key in f.keys():
                    t = f.get_tensor(key)
                    state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: {e}. The file is truncated or corrupt; "
                                  "delete it and download it again.") from e
    return state


def rename_keys(state: Mapping[str, torch.Tensor],
                rules: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Apply prefix renames ``{old_prefix: new_prefix}`` (a small declarative table)."""
    out = {}
    for key, value in state.items():
        for old, new in rules.items():
            already = new.startswith(old) and key.startswith(new)  # e.g. a checkpoint already renamed
            if key.startswith(old) and not already:
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def load_state_dict_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor],
                           what: str = "checkpoint") -> None:
    """Load ``state`` into ``module`` (which may live on the meta device) with assign=True.

    Missing keys, unexpected keys and shape mismatches are one CheckpointError that lists them.
    Non-persistent buffers are not part of the check; a model built on meta re-creates its own.
    """
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_short_list(wrong, 10)}")
    if problems:
        raise CheckpointError(f"{what} does not match the model config: " + "; ".join(problems)
                              + ". Check that config.json belongs to these weights.")
    module.load_state_dict(dict(state), strict=True, assign=True)


def save_sharded(state: Mapping[str, torch.Tensor], directory: str, index_name: str,
                 shard_name: str, num_shards: int = 2, dtype: torch.dtype | None = None) -> list[str]:
    """Write ``state`` as ``num_shards`` safetensors files plus an index, in the official layout.

    ``shard_name`` is a format string with ``{i}`` and ``{n}`` (5-digit, 1-based), e.g.
    ``"model-{i:05d}-of-{n:05d}.safetensors"``. Keys are split in order, by count.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    keys = list(state)
    num_shards = max(1, min(num_shards, len(keys)))
    per = -(-len(keys) // num_shards)
    weight_map, paths = {}, []
    for i in range(num_shards):
        name = shard_name.format(i=i + 1, n=num_shards)
        part = {k: state[k].detach().contiguous() for k in keys[i * per:(i + 1) * per]}
        if dtype is not None:
            part = {k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()}
        save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        paths.append(os.path.join(directory, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    write_json_atomic(os.path.join(directory, index_name),
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths
