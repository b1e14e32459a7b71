"""Splitting one prompt suite over N independent jobs: ``run_benchmark.py --shard K/N``.

Every shard reads the same suite and makes the same selection (``--lines``, ``--limit``), then
keeps every N-th prompt starting at the K-th (round-robin, so each shard gets a share of every
category). The shards need no coordination: they may run at once, on any mix of nodes, into the
same ``--save_path``. Each prompt has its own directory; each shard appends to its own manifest
part, ``manifest.shard-K-of-N.jsonl``, and writes ``summary.shard-K-of-N.json``, which also lists
the whole selection. A rerun of a shard skips its prompts whose outputs are valid (as an unsharded
rerun does), so a killed shard loses at most its prompt in flight.

:func:`write_merged_summary` turns the parts into one ``summary.json`` over the whole selection,
counting a shard that has not reported yet as pending; each shard calls it when it finishes and
``benchmark/report.py`` calls it before writing the gallery.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from .fileio import write_json_atomic
from .suite import SUMMARY, PromptEntry, SuiteError, read_manifest, summarize

T = TypeVar("T")
SUMMARY_PART = re.compile(r"summary\.shard-(\d+)-of-(\d+)\.json")


@dataclass(frozen=True)
class Shard:
    """The K-th of N shards (1-based)."""

    index: int
    count: int

    def __post_init__(self):
        if not 1 <= self.index <= self.count:
            raise SuiteError(f"--shard {self.index}/{self.count}: K must be between 1 and "
                             f"N = {self.count}")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise SuiteError(f"--shard {text!r}: use K/N, e.g. 1/4 for the first of 4 jobs")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def tag(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    @property
    def manifest(self) -> str:
        return f"manifest.{self.tag}.jsonl"

    @property
    def summary(self) -> str:
        return f"summary.{self.tag}.json"

    def select(self, items: Sequence[T]) -> list[T]:
        """Items K, K+N, K+2N, ... (1-based) of the selection."""
        return list(items[self.index - 1::self.count])


def selection_of(entries: Sequence[PromptEntry]) -> list[list]:
    """The whole selection as JSON: ``[[line, category], ...]``."""
    return [[e.index, e.category] for e in entries]


def read_parts(save_path: str | os.PathLike) -> dict[str, dict]:
    """``{tag: summary part}`` for every ``summary.shard-K-of-N.json`` that parses."""
    parts = {}
    for path in sorted(Path(save_path).glob("summary.shard-*-of-*.json")):
        if not SUMMARY_PART.fullmatch(path.name):
            continue
        try:
            parts[path.name[len("summary."):-len(".json")]] = json.loads(
                path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
    return parts


def merged_summary(save_path: str | os.PathLike) -> dict | None:
    """One summary over the shards' whole selection from every manifest part, or None when no
    shard has reported. SuiteError when the parts disagree on the selection or the shard count
    (two different runs share the folder)."""
    parts = read_parts(save_path)
    if not parts:
        return None
    selections = {json.dumps(p.get("selection")) for p in parts.values()}
    counts = {int(SUMMARY_PART.fullmatch(f"summary.{t}.json").group(2)) for t in parts}
    if len(selections) != 1 or len(counts) != 1:
        raise SuiteError(f"the shard summaries in {save_path} come from different selections or "
                         f"shard counts ({', '.join(parts)}); give each run its own --save_path")
    selection = next(iter(parts.values()))["selection"]
    entries = [PromptEntry(int(i), "", c) for i, c in selection]
    count = counts.pop()
    missing = [f"shard-{k}-of-{count}" for k in range(1, count + 1)
               if f"shard-{k}-of-{count}" not in parts]
    info = {"shards": count, "reported": sorted(parts), "missing": missing,
            "per_shard": {t: p.get("run", {}) for t, p in sorted(parts.items())}}
    return summarize(entries, read_manifest(save_path), info)


def write_merged_summary(save_path: str | os.PathLike) -> str | None:
    """Write ``summary.json`` from the parts (see :func:`merged_summary`); its path, or None."""
    summary = merged_summary(save_path)
    if summary is None:
        return None
    return write_json_atomic(os.path.join(save_path, SUMMARY), summary)
