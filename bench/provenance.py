"""What a result row records about where it came from: library versions, git commit, and
the canonical JSON that cell and instance keys are hashed from."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

_LIBRARIES = ("certbench", "torch", "numpy", "scipy", "pandas", "safetensors", "auto_LiRPA")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that affect results (absent ones left out)."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the certbench checkout (with ``+dirty`` if modified), or None."""
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the form that cell keys are hashed from."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
