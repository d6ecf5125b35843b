"""Killing `certbench run` mid-way loses at most the cell in flight: a rerun finishes only
the missing cells and the tables stay readable (a real subprocess, killed with SIGKILL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

MATRIX = """
name = "resume"
dataset = "digits"
samples = 30
norms = ["2", "inf"]
eps = [0.01, 0.1]
device = "cpu"
imports = ["plugin_verifiers"]
[[models]]
name = "m"
arch = "mlp"
arch_args = { widths = [16] }
recipe_args = { epochs = 2 }
[[verifiers]]
name = "test-slow"
options = { pause = 0.7 }
[[verifiers]]
name = "test-slow"
options = { pause = 0.7, bound = "lmt" }
[[verifiers]]
name = "global-lipschitz"
"""


def _command(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "certbench.cli", "run", "--matrix", str(tmp_path / "m.toml"),
            "--results", str(tmp_path / "r"), "--checkpoint-dir", str(tmp_path / "c"), "--quiet"]


def _env() -> dict[str, str]:
    tests = str(Path(__file__).resolve().parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))


def _finished_cells(cells: Path) -> int:
    try:
        return len(pd.read_parquet(cells))
    except (OSError, ValueError):
        return 0


def test_killed_run_resumes_with_only_the_missing_cells(tmp_path):
    (tmp_path / "m.toml").write_text(MATRIX)
    cells = tmp_path / "r" / "cells.parquet"
    proc = subprocess.Popen(_command(tmp_path), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _finished_cells(cells) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _finished_cells(cells)
    assert 2 <= done_before < 6, "the kill did not land mid-run"
    for table in ("cells", "certified", "samples"):
        pd.read_parquet(tmp_path / "r" / f"{table}.parquet")  # readable after the kill

    rerun = subprocess.run(_command(tmp_path), env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    ran, skipped = map(int, re.search(r"(\d+) cell\(s\) run, (\d+) already done",
                                      rerun.stdout).groups())
    assert skipped == done_before and ran == 6 - done_before
    table = pd.read_parquet(cells)
    samples = pd.read_parquet(tmp_path / "r" / "samples.parquet")
    assert len(table) == 6 and table["cell_key"].is_unique and (table["status"] == "ok").all()
    assert len(samples) == 6 * 30 * 2
    assert set(samples["cell_key"]) == set(table["cell_key"])
