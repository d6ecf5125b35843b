"""scripts/gpu_run.py as a dry run on the CPU (tiny sizes, CPU against CPU), as it is
checked before device time is spent: every stage runs and ends ok, the output folder has
what comes back from the GPU machine, and the bab stage answers from the carried sample.
The zoo stage's folder and copy-back with a stand-in for the build."""

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
import gpu_run  # noqa: E402
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


def test_the_zoo_stage_builds_in_a_scratch_folder_and_brings_back_what_it_wrote(
        tmp_path, monkeypatch):
    """The scratch zoo holds the network's carried files over its committed ones and
    nothing of other networks; a build killed at the deadline brings back the files it
    wrote (not those it was given, nor a half-written temporary), and the checkout's zoo
    folder is untouched."""
    farm = gpu_run.link_farm(tmp_path / "links")
    name = "gloro-mnist-4c3f"  # committed weights and card
    carry = tmp_path / "carry"
    (carry / "zoo").mkdir(parents=True)
    (carry / "zoo" / f"{name}.optimizer.pt").write_bytes(b"carried moments")
    networks = gpu_run.zoo_folder(farm, carry, [name])
    committed = ROOT / "bench" / "zoo" / "networks"
    assert sorted(p.name for p in networks.iterdir()) == sorted(
        [f"{name}.json", f"{name}.optimizer.pt", f"{name}.safetensors"])
    assert (networks / f"{name}.optimizer.pt").read_bytes() == b"carried moments"
    before = {p.name: p.stat().st_mtime for p in committed.glob(f"{name}.*")}

    stand_in = (f"import pathlib, time; n = pathlib.Path({str(networks)!r}); "
                f"(n / '{name}.resume.safetensors').write_bytes(b'epoch 1'); "
                f"(n / '.{name}.resume.safetensors.tmp').write_bytes(b'half'); "
                "time.sleep(60)")
    monkeypatch.setattr(gpu_run, "certbench", lambda *args: [sys.executable, "-c", stand_in])
    monkeypatch.setattr(gpu_run, "COPY_BACK_S", 0.0)
    run = gpu_run.Run(tmp_path / "out", tmp_path / "work", budget_s=8.0)
    gpu_run.build_zoo(run, [name], networks, True, {"CERTBENCH_DATA": str(tmp_path)})
    assert [s["status"] for s in run.summary] == ["deadline"]
    back = tmp_path / "out" / "zoo"
    assert [p.name for p in back.iterdir()] == [f"{name}.resume.safetensors"]
    assert (back / f"{name}.resume.safetensors").read_bytes() == b"epoch 1"
    assert {p.name: p.stat().st_mtime for p in committed.glob(f"{name}.*")} == before
