"""Timing rounds (``[timing] rounds``): each cell is timed again in later rounds spread
over the run, merged into its row; raising ``rounds`` on a finished folder adds the
missing rounds without certifying again; a failed round leaves the certificates alone and
is retried; and `certbench compare` resamples rounds, not the passes inside one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from test_runner import small_matrix

import certbench
from certbench.report.compare import compare, ratio_interval
from certbench.run.cells import TimingRound, add_timing_round
from certbench.run.executors import InlineExecutor
from certbench.run.runner import run_matrix


def _spec(rounds: int):
    return small_matrix(samples=20, norms=["2"], eps=[0.1, 0.5], attack={"enabled": False},
                        timing={"rounds": rounds, "min_repeats": 2, "max_repeats": 2,
                                "budget_s": 0.0})


def _cells(folder):
    return pd.read_parquet(folder / "cells.parquet").sort_values("cell_key")


def test_every_cell_is_timed_in_each_round_and_keeps_its_first_certificates(tmp_path):
    run_matrix(_spec(1), tmp_path / "one", tmp_path / "ckpt", progress=False,
               log=lambda _: None)
    run_matrix(_spec(3), tmp_path / "three", tmp_path / "ckpt", progress=False,
               log=lambda _: None)
    for row in _cells(tmp_path / "three").to_dict("records"):
        walls, rounds = np.asarray(row["certify_runs_s"]), np.asarray(row["certify_run_rounds"])
        assert row["certify_rounds"] == 3 and row["certify_passes"] == 6 == len(walls)
        assert sorted(rounds) == [0, 0, 1, 1, 2, 2]
        assert len(row["certify_cpu_runs_s"]) == 6
        medians = [np.median(walls[rounds == r]) for r in range(3)]
        assert row["certify_s"] == pytest.approx(np.median(medians))
        assert row["per_sample_s"] == pytest.approx(row["certify_s"] / 20)
    one = pd.read_parquet(tmp_path / "one" / "samples.parquet")
    three = pd.read_parquet(tmp_path / "three" / "samples.parquet")
    pd.testing.assert_frame_equal(
        one.sort_values(["cell_key", "sample_index", "eps"])[["cell_key", "verdict"]]
        .reset_index(drop=True),
        three.sort_values(["cell_key", "sample_index", "eps"])[["cell_key", "verdict"]]
        .reset_index(drop=True))


def test_raising_rounds_adds_the_missing_ones_without_certifying_again(tmp_path):
    results, logs = tmp_path / "results", []
    run_matrix(_spec(1), results, tmp_path / "ckpt", progress=False, log=logs.append)
    before = _cells(results)
    assert (before["certify_rounds"] == 1).all()
    samples = pd.read_parquet(results / "samples.parquet")
    run_matrix(_spec(3), results, tmp_path / "ckpt", progress=False, log=logs.append)
    after = _cells(results)
    assert "0 cell(s) run" in logs[-1]
    assert (after["certify_rounds"] == 3).all() and (after["certify_passes"] == 6).all()
    assert list(after["started_at"]) == list(before["started_at"])
    pd.testing.assert_frame_equal(pd.read_parquet(results / "samples.parquet"), samples)
    for b, a in zip(before["certify_runs_s"], after["certify_runs_s"], strict=True):
        assert list(a[:2]) == list(b)  # the first round's passes are kept


def test_a_failed_timing_round_is_named_and_retried_by_the_next_run(tmp_path, monkeypatch):
    results, logs = tmp_path / "results", []

    def broken(self):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(TimingRound, "run", broken)
    run_matrix(_spec(2), results, tmp_path / "ckpt", progress=False, log=logs.append,
               executor=InlineExecutor())
    cells = _cells(results)
    assert (cells["status"] == "ok").all() and (cells["certify_rounds"] == 1).all()
    assert any("timing round 2" in line and "worker lost" in line for line in logs)
    monkeypatch.undo()
    run_matrix(_spec(2), results, tmp_path / "ckpt", progress=False, log=logs.append,
               executor=InlineExecutor())
    assert (_cells(results)["certify_rounds"] == 2).all()


def test_the_python_api_times_in_rounds_too():
    from certbench.data import load_dataset
    from conftest import random_model

    data = load_dataset("digits")
    result = certbench.evaluate(random_model("mlp", widths=[16]), data.x_test[:8],
                                data.y_test[:8], verifiers=["ibp", "crown"], eps=[0.01],
                                attack=False, progress=False,
                                timing={"rounds": 3, "min_repeats": 2, "max_repeats": 2})
    assert list(result.cells["certify_rounds"]) == [3, 3]
    assert [len(r) for r in result.cells["certify_runs_s"]] == [6, 6]


def test_a_row_from_before_repetitions_gains_rounds():
    row = {"certify_s": 2.0, "certify_cpu_s": 3.0, "n_samples": 4, "certify_runs_s": None}
    merged = add_timing_round(row, 1, [1.0, 1.2], [1.5, 1.7])
    assert merged["certify_runs_s"] == [2.0, 1.0, 1.2]
    assert merged["certify_run_rounds"] == [0, 1, 1] and merged["certify_rounds"] == 2
    assert merged["certify_s"] == pytest.approx((2.0 + 1.1) / 2)


def _rounds(rng, factor, rounds=5, passes=4, machine=0.15):
    """Pass times of a cell timed in ``rounds`` rounds: each round at a machine speed of
    its own (log-normal, ``machine``), the passes inside a round within 0.5 %."""
    speed = factor * np.exp(machine * rng.standard_normal(rounds))
    times = np.repeat(speed, passes) * (1 + 0.005 * rng.standard_normal(rounds * passes))
    return times, np.repeat(np.arange(rounds), passes)


def test_rounds_are_the_resampled_unit_so_machine_drift_does_not_fail_the_gate():
    rng = np.random.default_rng(4)
    trials, threshold, by_round, by_pass = 300, 1.3, 0, 0
    for t in range(trials):
        (b, br), (c, cr) = _rounds(rng, 1.0), _rounds(rng, threshold)
        by_round += ratio_interval(b, c, resamples=1000, seed=t, baseline_rounds=br,
                                   candidate_rounds=cr)[1] > threshold
        by_pass += ratio_interval(b, c, resamples=1000, seed=t)[1] > threshold
    # at a true ratio equal to the threshold: nominal 2.5 %, a rate of 8 % is rejected;
    # resampling passes as if independent raises far more alarms
    assert binomtest(by_round, trials, 0.08, alternative="less").pvalue < 0.05
    assert by_pass > 3 * by_round


def test_compare_reads_the_rounds_of_both_sides(tmp_path):
    rng = np.random.default_rng(5)
    folders = {}
    for name, factor in (("base", 1.0), ("same", 1.0), ("slow", 2.0)):
        times, rounds = _rounds(rng, factor, machine=0.05)
        folder = tmp_path / name
        folder.mkdir()
        pd.DataFrame([{
            "cell_key": "k", "model": "m", "verifier": "v", "norm": "2", "dataset": "digits",
            "n_samples": 10, "checkpoint_sha256": "s", "status": "ok",
            "probabilistic": False, "soundness_violations": 0,
            "certify_s": float(np.median(times)), "per_sample_s": float(np.median(times)) / 10,
            "certify_cpu_s": float(np.median(times)), "certify_runs_s": list(times),
            "certify_cpu_runs_s": list(times), "certify_run_rounds": list(rounds)}]
        ).to_parquet(folder / "cells.parquet")
        pd.DataFrame([{"cell_key": "k", "eps": 0.1, "certified_acc": 0.5,
                       "attack_upper_bound": 0.9}]).to_parquet(folder / "certified.parquet")
        folders[name] = folder
    assert compare(folders["base"], folders["same"], max_slowdown=1.3).passed
    slow = compare(folders["base"], folders["slow"], max_slowdown=1.3)
    assert not slow.passed and slow.table["ratio_low"].iloc[0] > 1.3
