"""Locate and read the conformance kit (ground-truth vectors from the public release).

The kit lives in ``$STEPVIDEO_CONFORMANCE_DIR`` (default ``../shared/conformance`` next to the
repository). Tests take configs, shapes and tolerances from the kit's own JSON files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file


def kit_dir() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
    path = Path(os.environ.get("STEPVIDEO_CONFORMANCE_DIR", default))
    if not path.is_dir():
        raise FileNotFoundError(
            f"conformance kit not found at {path}; set STEPVIDEO_CONFORMANCE_DIR to its directory")
    return path


def load_json(name: str) -> dict:
    with open(kit_dir() / name, encoding="utf-8") as f:
        return json.load(f)


def load_tensors(name: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    tensors = load_file(str(kit_dir() / name))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str = "") -> float:
    """torch.testing.assert_close with the kit's atol/rtol; returns the max abs error."""
    atol = float(tol.get("atol", 0.0))
    rtol = float(tol.get("rtol", 0.0))
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: max abs err {err:.3g} (atol {atol}): {m}")
    return err
