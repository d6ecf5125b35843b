"""The Ray executor on a local Ray instance (loopback only): missing models trained as
tasks, cells contained as in the local executor, rows collected on the driver, resume,
and a fail-fast message for a CUDA cell on a cluster without GPUs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from test_executors import planted_matrix

from certbench.errors import UserError
from certbench.run.runner import run_matrix

ray = pytest.importorskip("ray", reason="the ray executor is the optional extra certbench[ray]")


@pytest.fixture(scope="module")
def executor():
    from certbench.run.ray_executor import RayExecutor

    tests = str(Path(__file__).resolve().parent)  # the planted verifiers, on every worker
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests}})
    yield RayExecutor()
    ray.shutdown()


def test_a_matrix_on_ray_trains_runs_contains_and_resumes(tmp_path, executor):
    spec = planted_matrix([
        {"name": "global-lipschitz"},
        {"name": "crown"},
        {"name": "test-hang", "timeout_s": 3},
        {"name": "test-crash"},
    ], attack={"steps": 5})
    logs = []
    run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False, log=logs.append,
               executor=executor)
    assert list((tmp_path / "c").glob("*.safetensors")), "the model was not trained"
    cells = pd.read_parquet(tmp_path / "r" / "cells.parquet").set_index("method")
    assert cells.loc["global-lipschitz", "status"] == "ok"
    assert cells.loc["crown", "status"] == "ok"
    assert cells.loc["crown", "soundness_violations"] == 0
    assert cells.loc["test-hang", "status"] == "timeout"
    assert "SIGSEGV" in cells.loc["test-crash", "error"]
    assert cells["executor"].str.startswith("ray[").all()
    samples = pd.read_parquet(tmp_path / "r" / "samples.parquet")
    assert len(samples) == 2 * 20

    run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False, log=logs.append,
               executor=executor)
    assert "2 cell(s) run, 2 already done" in logs[-1]  # the failed cells are retried


def test_a_cuda_cell_on_a_cluster_without_gpus_fails_at_once(tmp_path, executor):
    spec = planted_matrix([{"name": "global-lipschitz"}], device="cuda")
    with pytest.raises(UserError, match="no GPU"):
        run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False, executor=executor)
