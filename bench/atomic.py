"""Atomic file writes: a reader (or a killed writer) sees the old file or the new one,
never a half-written one. The data goes to a hidden temporary file in the same folder
(so the rename stays on one file system) and ``os.replace`` renames it over the target,
which POSIX makes atomic."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``data`` (bytes, text, or a function that writes a given path, such as
    ``frame.to_parquet``) to ``path`` atomically; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    elif isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        data(tmp)
    os.replace(tmp, path)
    return path
