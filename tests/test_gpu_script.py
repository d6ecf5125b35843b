"""scripts/gpu_run.py as a dry run on the CPU (tiny sizes, CPU against CPU), as it is
checked before device time is spent: every stage runs and ends ok, the output folder has
what comes back from the GPU machine, and the bab stage answers from the carried sample."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_prepare import sample_bab_instances  # noqa: E402

TINY = """
name = "tiny"
dataset = "digits"
samples = 8
norms = ["inf"]
eps = [0.02]
attack = { steps = 5, restarts = 1, targeted = 0, bisection_steps = 2 }
[[models]]
name = "m"
arch = "mlp"
arch_args = { widths = [16] }
recipe_args = { epochs = 1 }
[[verifiers]]
name = "crown"
[[verifiers]]
name = "global-lipschitz"
"""


@pytest.mark.skipif(not (SHARED_DATA / "vnncomp2022" / "mnist_fc").exists(),
                    reason=f"VNN-COMP 2022 mnist_fc not found in {SHARED_DATA}")
def test_dry_run_runs_every_stage_and_packs_its_output(tmp_path):
    carry = tmp_path / "carry"
    data = carry / "data"
    (data / "vnncomp2022" / "mnist_fc").mkdir(parents=True)
    for entry in (SHARED_DATA / "vnncomp2022" / "mnist_fc").iterdir():
        (data / "vnncomp2022" / "mnist_fc" / entry.name).symlink_to(entry)
    sample_bab_instances(data, 1)
    matrix = tmp_path / "tiny.toml"
    matrix.write_text(TINY)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_run.py"), "--carry", str(carry),
         "--out", str(out), "--dry-run", "--matrices", str(matrix),
         "--pytest-args", "-k", "harness"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    stages = {s["stage"]: s["status"] for s in json.loads((out / "summary.json").read_text())}
    assert stages["tests"] == "ok" and stages["tiny"] == "ok" and stages["bab"] == "ok", stages
    assert all(status == "ok" for status in stages.values()), stages
    assert "1 passed" in (out / "log.txt").read_text()
    assert (out / "cuda-tests.xml").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "cuda-tests.xml", "log.txt", "reports.tar.gz", "results.tar.gz", "summary.json"]
    with tarfile.open(out / "results.tar.gz") as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "back", filter="data")
    assert "results/tiny/cells.parquet" in names
    assert "results/vnncomp-mnist_fc/instances.parquet" in names
    cells = pd.read_parquet(tmp_path / "back" / "results" / "tiny" / "cells.parquet")
    assert (cells["status"] == "ok").all() and set(cells["device"]) == {"cpu"}
    answer = pd.read_parquet(tmp_path / "back" / "results" / "vnncomp-mnist_fc" /
                             "instances.parquet")
    assert answer["result"].isin(["unsat", "sat", "unknown", "timeout"]).all()
