"""Locate and read the conformance kit (ground-truth vectors from the public release).

The kit lives in ``$STEPVIDEO_CONFORMANCE_DIR``; from a repository checkout the default is
``../shared/conformance`` beside the checkout. Tests and ``benchmark/gpu_check.py`` take configs,
shapes and tolerances from the kit's own JSON files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file


ENV = "STEPVIDEO_CONFORMANCE_DIR"


def checkout_root() -> Path | None:
    """The repository checkout this package is imported from, or None when it is installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "setup.py").is_file() and (root / "tests").is_dir() else None


def kit_dir() -> Path:
    """``$STEPVIDEO_CONFORMANCE_DIR``, else ``../shared/conformance`` beside the checkout."""
    if os.environ.get(ENV):
        path = Path(os.environ[ENV])
    elif (root := checkout_root()) is not None:
        path = root.parent / "shared" / "conformance"
    else:
        raise FileNotFoundError(f"conformance kit: stepvideo is installed, not a checkout, so there "
                                f"is no default; set {ENV} to the kit's directory")
    if not path.is_dir():
        raise FileNotFoundError(f"conformance kit not found at {path}; set {ENV} to its directory")
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
