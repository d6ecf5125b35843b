"""What a result row records about where it came from: library versions, git commit, and
the canonical JSON that cell and instance keys are hashed from."""

from __future__ import annotations

import json
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

_LIBRARIES = ("certbench", "torch", "numpy", "scipy", "pandas", "safetensors", "auto_LiRPA")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that affect results (absent ones left out) and, where
    CUDA is present, the GPU, its CUDA runtime and driver (`gpu_description`)."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions | gpu_description()


def gpu_description() -> dict[str, str]:
    """The first CUDA device's name, torch's CUDA runtime and the NVIDIA driver version
    (from ``/proc/driver/nvidia/version``, else ``nvidia-smi``); empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    found = {"gpu": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda)}
    driver = _nvidia_driver()
    return found | ({"nvidia_driver": driver} if driver else {})


def _nvidia_driver() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout else None
    except (OSError, subprocess.SubprocessError):
        return None


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
