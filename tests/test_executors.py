"""Cells in worker processes: a hung cell ends as timeout, a crashed worker as error with
its signal, a runaway allocation as oom, each with its reason, while the other cells of
the same run finish with their results; CPU memory is each cell's own."""

from __future__ import annotations

import pandas as pd
import pytest

from certbench.matrix import parse_matrix
from certbench.run.executors import InlineExecutor, ProcessExecutor
from certbench.run.runner import run_matrix

MIB = 2**20


def planted_matrix(verifiers, **overrides):
    data = {
        "name": "planted", "dataset": "digits", "samples": 20, "norms": ["2"], "eps": [0.1],
        "device": "cpu", "imports": ["plugin_verifiers"], "timeout_s": 20,
        "attack": {"enabled": False},
        "models": [{"name": "m", "arch": "mlp", "arch_args": {"widths": [16]},
                    "recipe_args": {"epochs": 1}}],
        "verifiers": verifiers,
    }
    data.update(overrides)
    return parse_matrix(data)


def _cells(spec, tmp_path, executor):
    run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False, log=lambda _: None,
               executor=executor)
    cells = pd.read_parquet(tmp_path / "r" / "cells.parquet").set_index("method")
    samples = pd.read_parquet(tmp_path / "r" / "samples.parquet")
    return cells, samples


def test_hung_crashed_and_runaway_cells_are_contained(tmp_path):
    spec = planted_matrix([
        {"name": "global-lipschitz"},
        {"name": "test-hang", "timeout_s": 3},
        {"name": "test-crash"},
        {"name": "test-hog"},
        {"name": "test-failing"},
        {"name": "global-lipschitz", "options": {"bound": "lmt"}},
    ])
    executor = ProcessExecutor(workers=2, memory_limit_bytes=768 * MIB)
    cells, samples = _cells(spec, tmp_path, executor)
    assert cells.loc["test-hang", "status"] == "timeout"
    assert "limit of 3 s" in cells.loc["test-hang", "error"]
    assert cells.loc["test-crash", "status"] == "error"
    assert "SIGSEGV" in cells.loc["test-crash", "error"]
    assert cells.loc["test-hog", "status"] == "oom"
    assert "exceeded the limit of 0.75 GiB" in cells.loc["test-hog", "error"]
    assert cells.loc["test-failing", "status"] == "error"
    assert "planted failure" in cells.loc["test-failing", "error"]
    finished = cells[cells["status"] == "ok"]
    assert len(finished) == 2 and (finished["verifier"].str.startswith("global-lipschitz")).all()
    assert set(samples["cell_key"]) == set(finished["cell_key"])  # failed cells: no samples
    assert (samples.groupby("cell_key").size() == 20).all()
    assert cells["executor"].str.startswith("process[workers=2").all()


def test_a_timed_out_cell_is_retried_by_a_rerun_with_more_time(tmp_path):
    verifiers = [{"name": "global-lipschitz"}, {"name": "test-slow", "options": {"pause": 3}}]
    first, _ = _cells(planted_matrix(verifiers, timeout_s=1.5), tmp_path, ProcessExecutor())
    assert first.loc["test-slow", "status"] == "timeout"
    second, _ = _cells(planted_matrix(verifiers, timeout_s=30), tmp_path, ProcessExecutor())
    assert second.loc["test-slow", "status"] == "ok"
    assert second.loc["test-slow", "cell_key"] == first.loc["test-slow", "cell_key"]
    assert second.loc["global-lipschitz", "run_id"] == first.loc["global-lipschitz", "run_id"]


@pytest.mark.parametrize("mib", [256, 512])
def test_cpu_memory_of_a_cell_is_its_own(tmp_path, mib):
    """A verifier that holds ``mib`` MiB is measured within 10 %, also after a cell that
    held more (in one process, the second would reuse the first's freed memory)."""
    spec = planted_matrix([
        {"name": "test-allocate", "options": {"mib": 2 * mib}, "label": "before"},
        {"name": "test-allocate", "options": {"mib": mib}, "label": "measured"},
    ])
    cells, _ = _cells(spec, tmp_path, ProcessExecutor())
    measured = cells.set_index("verifier").loc["measured"]
    assert measured["status"] == "ok" and measured["mem_kind"] == "rss"
    assert abs(measured["peak_mem_bytes"] / (mib * MIB) - 1) < 0.10, measured["peak_mem_bytes"]


def test_workers_and_inline_give_the_same_verdicts(tmp_path):
    spec = planted_matrix([{"name": "global-lipschitz"}, {"name": "crown"}, {"name": "ibp"}],
                          norms=["2", "inf"], eps=[0.01, 0.1], attack={"steps": 5})
    parallel, a = _cells(spec, tmp_path / "p", ProcessExecutor(workers=2))
    inline, b = _cells(spec, tmp_path / "i", InlineExecutor())
    columns = ["cell_key", "sample_index", "eps", "verdict", "prediction"]
    pd.testing.assert_frame_equal(a.sort_values(columns[:3])[columns].reset_index(drop=True),
                                  b.sort_values(columns[:3])[columns].reset_index(drop=True))
    assert (parallel["soundness_violations"] == 0).all()
    assert (parallel["attack_s"] > 0).all() and inline["attack_error"].isna().all()


def test_the_api_runs_in_workers_and_explains_a_model_they_cannot_load(digits):
    import torch
    from torch import nn

    import certbench
    from certbench.models import build_model

    x, y = digits.x_test[:10], digits.y_test[:10]
    model = build_model("mlp", (1, 8, 8), 10, [0.5], [0.5], {"widths": [16]}).eval()
    inline = certbench.evaluate(model, x, y, verifiers=["crown"], attack=False, progress=False)
    isolated = certbench.evaluate(model, x, y, verifiers=["crown"], attack=False,
                                  progress=False, executor=ProcessExecutor())
    assert (isolated.cells["status"] == "ok").all()
    assert isolated.samples["margin_lb"].tolist() == inline.samples["margin_lb"].tolist()

    class Local(nn.Module):  # a class no worker can import
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, z):
            return self.linear(torch.flatten(z, 1))

    failed = certbench.evaluate(Local(), x, y, verifiers=["ibp"], attack=False,
                                progress=False, executor=ProcessExecutor())
    assert failed.cells["status"].item() == "error"
    assert "inline executor" in failed.cells["error"].item()
