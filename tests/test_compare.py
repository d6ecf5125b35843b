"""`certbench compare`'s time rule: the bootstrap interval of the time ratio covers the
true ratio, fails a cell at the threshold only about (1 - confidence) / 2 of the time,
detects a planted slowdown, and only the interval rule shrugs off a noisy cell that the
plain-ratio rule fails; results from before repetitions still compare."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from test_runner import small_matrix

from certbench.cli import main
from certbench.report.compare import compare, ratio_interval
from certbench.run.runner import run_matrix


def _noisy(rng, median, n, spread):
    """n pass times around ``median`` with log-normal noise of ``spread``."""
    return median * np.exp(spread * rng.standard_normal(n))


def test_interval_covers_the_true_ratio():
    rng = np.random.default_rng(1)
    trials, covered = 300, 0
    for t in range(trials):
        base, cand = _noisy(rng, 1.0, 10, 0.1), _noisy(rng, 1.4, 10, 0.1)
        _, low, high = ratio_interval(base, cand, resamples=1000, seed=t)
        covered += low <= 1.4 <= high
    # nominal 95 %; the percentile bootstrap of a median of 10 under-covers a little
    assert covered / trials >= 0.88


def test_false_alarm_rate_at_the_threshold_is_near_half_of_one_minus_confidence():
    rng = np.random.default_rng(2)
    trials, threshold = 400, 1.3
    alarms = 0
    for t in range(trials):
        base, cand = _noisy(rng, 1.0, 8, 0.15), _noisy(rng, threshold, 8, 0.15)
        alarms += ratio_interval(base, cand, resamples=1000, seed=t)[1] > threshold
    # nominal 2.5 %: a rate of 6 % or more is rejected
    assert binomtest(alarms, trials, 0.06, alternative="less").pvalue < 0.05


def test_interval_of_single_passes_is_the_point():
    assert ratio_interval(np.array([2.0]), np.array([3.0])) == (1.5, 1.5, 1.5)


def _results(folder, runs: dict[str, list[float]], acc: float = 0.5, with_runs=True):
    """A results folder with one ok cell per verifier, timed in the given passes."""
    cells, certified = [], []
    for i, (verifier, passes) in enumerate(runs.items()):
        key = f"k{i}"
        row = {"cell_key": key, "model": "m", "verifier": verifier, "norm": "2",
               "dataset": "digits", "n_samples": 10, "checkpoint_sha256": "s",
               "status": "ok", "probabilistic": False, "soundness_violations": 0,
               "certify_s": float(np.median(passes)),
               "per_sample_s": float(np.median(passes)) / 10,
               "certify_cpu_s": float(np.median(passes)) * 2}
        if with_runs:
            row.update(certify_runs_s=list(passes),
                       certify_cpu_runs_s=[2 * p for p in passes])
        cells.append(row)
        certified.append({"cell_key": key, "eps": 0.1, "certified_acc": acc,
                          "attack_upper_bound": 0.9})
    folder.mkdir()
    pd.DataFrame(cells).to_parquet(folder / "cells.parquet")
    pd.DataFrame(certified).to_parquet(folder / "certified.parquet")
    return folder


STEADY = [0.100, 0.104, 0.098, 0.101, 0.097, 0.103, 0.099, 0.102]


def test_planted_slowdowns_fail_or_pass_as_their_interval_says(tmp_path, capsys):
    base = _results(tmp_path / "base", {"a": STEADY, "b": STEADY})
    slow = _results(tmp_path / "slow", {"a": [1.5 * t for t in STEADY], "b": STEADY})
    result = compare(base, slow, max_slowdown=1.3)
    row = result.table.set_index("verifier").loc["a"]
    assert row["time_ratio"] == pytest.approx(1.5)
    assert row["ratio_low"] > 1.3 and row["ratio_low"] <= 1.5 <= row["ratio_high"]
    assert len(result.failures) == 1 and result.failures[0].startswith("m / a / l2: 1.50x")
    slight = _results(tmp_path / "slight", {"a": [1.05 * t for t in STEADY], "b": STEADY})
    result = compare(base, slight, max_slowdown=1.3)
    assert result.passed
    low = result.table.set_index("verifier").loc["a", "ratio_low"]
    assert low < 1.05  # the interval, not the point, decides; at a 1.0 threshold:
    assert compare(base, slight, max_slowdown=1.0).passed == (low <= 1.0)
    assert main(["compare", str(base), str(slow), "--max-slowdown", "1.3"]) == 1
    out = capsys.readouterr().out
    assert "95% interval [" in out and "run factor" in out


def test_a_noisy_cell_fails_the_ratio_rule_but_not_the_interval_rule(tmp_path):
    base = _results(tmp_path / "base", {"a": [0.08, 0.10, 0.12, 0.09, 0.11]})
    noisy = _results(tmp_path / "noisy", {"a": [0.09, 0.13, 0.16, 0.11, 0.14]})
    assert compare(base, noisy, max_slowdown=1.2).passed
    assert not compare(base, noisy, max_slowdown=1.2, rule="ratio").passed


def test_cpu_clock_and_time_floor(tmp_path):
    base = _results(tmp_path / "base", {"a": STEADY})
    slow = _results(tmp_path / "slow", {"a": [2 * t for t in STEADY]})
    result = compare(base, slow, max_slowdown=1.3, clock="cpu")
    assert not result.passed and "cpu clock" in result.failures[0]
    assert result.table["cpu_ratio"].iloc[0] == pytest.approx(2.0)
    assert compare(base, slow, max_slowdown=1.3, time_floor_s=0.5).passed


def test_results_without_repetitions_compare_by_their_single_time(tmp_path):
    base = _results(tmp_path / "base", {"a": [0.1]}, with_runs=False)
    slow = _results(tmp_path / "slow", {"a": STEADY * 2}, with_runs=True)
    result = compare(base, slow, max_slowdown=0.9)
    assert result.table["passes"].iloc[0] == "1/16"
    assert not result.passed


def test_accuracy_drops_failed_cells_and_violations_still_fail(tmp_path):
    base = _results(tmp_path / "base", {"a": STEADY})
    weaker = _results(tmp_path / "weaker", {"a": STEADY}, acc=0.4)
    assert not compare(base, weaker, max_slowdown=1.3, max_acc_drop=0.0).passed
    failed = _results(tmp_path / "failed", {"a": STEADY})
    cells = pd.read_parquet(failed / "cells.parquet").assign(status="timeout")
    cells.to_parquet(failed / "cells.parquet")
    assert "status timeout" in compare(base, failed).failures[0]
    unsound = _results(tmp_path / "unsound", {"a": STEADY})
    cells = pd.read_parquet(unsound / "cells.parquet").assign(soundness_violations=2)
    cells.to_parquet(unsound / "cells.parquet")
    assert "2 soundness violation(s)" in compare(base, unsound).failures[0]


def test_bad_rule_settings_are_user_errors(tmp_path, capsys):
    base = _results(tmp_path / "base", {"a": STEADY})
    assert main(["compare", str(base), str(base), "--confidence", "1.5"]) == 2
    assert "confidence" in capsys.readouterr().err


def _delay_run(tmp_path, name, slowdown):
    spec = small_matrix(
        name="gate", samples=20, norms=["2"], eps=[0.1], attack={"enabled": False},
        models=[{"name": "std", "arch": "mlp", "arch_args": {"widths": [16]},
                 "recipe_args": {"epochs": 1}}],
        imports=["plugin_verifiers"],
        verifiers=[{"name": "test-delay", "label": "delayed",
                    "options": {"slowdown": slowdown, "pause_s": 0.05}}],
        timing={"budget_s": 1.0, "min_repeats": 3})
    run_matrix(spec, tmp_path / name, tmp_path / "ckpt", progress=False, log=lambda _: None)
    return tmp_path / name


def test_real_runs_pass_when_identical_and_fail_a_planted_doubling(tmp_path):
    """Through `certbench run`: the certification is mostly a pause, so that a busy CI
    machine cannot blur a planted 2x (docs/measurements.md's study plants 50 % on a quiet one)."""
    base, same = _delay_run(tmp_path, "a", 0.0), _delay_run(tmp_path, "b", 0.0)
    slow = _delay_run(tmp_path, "c", 1.0)
    row = pd.read_parquet(base / "cells.parquet").iloc[0]
    assert row["certify_passes"] == len(row["certify_runs_s"]) >= 3
    assert row["certify_s"] == pytest.approx(np.median(row["certify_runs_s"]))
    assert compare(base, same, max_slowdown=1.3).passed
    result = compare(base, slow, max_slowdown=1.3)
    assert not result.passed, result.table.to_string()
    assert result.table["ratio_low"].iloc[0] > 1.3


def test_timing_rule_gives_cheap_cells_more_passes_and_checks_its_bounds():
    from certbench.errors import UserError
    from certbench.matrix import TimingSpec

    timing = TimingSpec(budget_s=1.0, max_repeats=10, min_repeats=2)
    assert [timing.passes(t) for t in (0.01, 0.3, 0.6, 5.0)] == [10, 4, 2, 2]
    assert TimingSpec().passes(3.0) == 1
    with pytest.raises(UserError, match="min_repeats"):
        small_matrix(timing={"min_repeats": 5, "max_repeats": 3})
