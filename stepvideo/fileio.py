"""Atomic file writes: every output (video, contact sheet, sidecar, manifest summary, downloads) is
written to a hidden temporary file beside its final path and renamed into place, so a killed run
leaves either the old file, the new file or a temporary that ``is_temp_file`` recognises.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid

_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.\w+)?$")


def _output_dir(path: str) -> str:
    """Create the parent directory of ``path``; a clear error if it cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create output directory {parent!r} for {path!r}: "
                      f"{err.strerror or err}") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {parent!r} is not writable; choose another "
                              f"path for {os.path.basename(path)!r}")
    return parent


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, else is removed."""
    parent = _output_dir(path)
    name, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp{ext}")
    try:  # O_EXCL: never clobber; mode 0o666 & ~umask like a plain open() (mkstemp gives 0o600)
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except OSError as err:
        raise PermissionError(f"cannot write to output directory {parent!r}: "
                              f"{err.strerror or err}") from err
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> str:
    text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is a temporary left by an interrupted ``atomic_path`` write."""
    return bool(_TEMP_NAME.match(name))
