"""`certbench compare BASELINE CANDIDATE`: two results folders, cell by cell.

Cells are matched by (model, verifier with its options, norm, dataset, number of samples),
not by cell key, so that a candidate with retrained models or another commit still lines
up; a changed checkpoint is flagged in the ``checkpoint`` column. Per matched cell:
``time_ratio`` = candidate / baseline time per sample, and per epsilon the certified
accuracy difference (candidate - baseline); ``acc_drop`` is the largest drop over the
epsilons both sides have.

A threshold is crossed when a cell is judged slower than ``max_slowdown`` (below),
``acc_drop > max_acc_drop``, a cell that was ``ok`` in the baseline is not ``ok`` in the
candidate, or the candidate has soundness violations; `certbench compare` then exits with
code 1, so it can gate a CI job. Cells present on one side only are listed, never dropped
silently; they do not fail the comparison unless ``fail_on_missing``.

**The time rule.** Each cell's certification was timed in several passes (the matrix's
``[timing]``; `cells.py`). ``time_ratio`` is the candidate's median pass time over the
baseline's (the same points on both sides, so also the ratio of times per sample), and
``ratio_low`` .. ``ratio_high`` its percentile bootstrap interval at ``confidence``
(0.95): both sides' passes are resampled with replacement (`ratio_interval`). With
``rule = "interval"`` (the default) a cell is judged slower only when the whole interval
lies above ``max_slowdown``: if the cell's true ratio is at the threshold, that happens
with probability about (1 - confidence) / 2 (2.5 %), less the further below it is. With
``rule = "ratio"`` the point ratio alone is held to the threshold (the old rule: every
pass of noise counts). ``clock = "cpu"`` judges CPU time instead of wall time.

A cell timed in several *rounds* (``[timing] rounds``: passes spread over the run, a
fresh worker per round) is summarised by the median of its rounds' median passes and
resampled by rounds, not passes: the passes of one round share the machine's speed of
that moment (on a shared VM it drifts by tens of percent over seconds), so treating them
as independent would give intervals far too narrow. What the interval does not see: a
slowdown of the whole machine between the two runs (another job, a warmer or cooler CPU)
moves every cell together and stays inside the ratio. The threshold is for that:
choose ``max_slowdown`` above the spread of identical runs on your machine (docs/measurements.md
gives what was measured here). ``run factor`` (the median ratio over the judged cells) is
printed so a machine-wide shift is visible. A cell timed once on both sides (its pass took
longer than the timing budget) has a point for an interval; give such cells
``min_repeats`` in a gate matrix. ``time_floor_s``: cells whose median pass took less
than that on both sides are shown but not judged on time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from certbench.errors import UserError
from certbench.report.view import ResultsView

MATCH = ["model", "verifier", "norm", "dataset", "n_samples"]


RULES = ("interval", "ratio")
CLOCKS = ("wall", "cpu")
RESAMPLES = 4000


@dataclass
class Comparison:
    table: pd.DataFrame
    only_baseline: pd.DataFrame
    only_candidate: pd.DataFrame
    failures: list[str] = field(default_factory=list)
    run_factor: float = float("nan")

    @property
    def passed(self) -> bool:
        return not self.failures


def _load(folder: str | Path) -> ResultsView:
    view = ResultsView.load(folder)
    if view.cells.duplicated(MATCH).any():
        raise UserError(f"{folder}: two cells share model, verifier and norm (several "
                        "matrices or devices in one folder); compare one matrix at a time")
    return view


def _units(times: np.ndarray, rounds: np.ndarray | None) -> np.ndarray:
    """What the bootstrap resamples: each timing round's median pass when the cell was
    timed in several rounds, else the passes themselves."""
    if rounds is None or len(np.unique(rounds)) < 2:
        return times
    return np.array([np.median(times[rounds == r]) for r in np.unique(rounds)])


def ratio_interval(
    baseline: np.ndarray, candidate: np.ndarray, confidence: float = 0.95,
    resamples: int = RESAMPLES, seed: int = 0, baseline_rounds: np.ndarray | None = None,
    candidate_rounds: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """median(candidate) / median(baseline) and its percentile bootstrap interval at
    ``confidence`` (Efron and Tibshirani 1993, Sec. 13.3): each side resampled with
    replacement, independently, ``resamples`` times. A side timed in several rounds
    (``*_rounds``: the round of each pass) is summarised by the median of its rounds'
    median passes and resampled by rounds, the independent units (the cluster bootstrap,
    Davison and Hinkley 1997, Sec. 3.8): passes of one round share the machine's speed of
    that moment. A side with one unit contributes no variation; with one on both sides the
    interval is the point."""
    base = _units(np.asarray(baseline, float), None if baseline_rounds is None
                  else np.asarray(baseline_rounds))
    cand = _units(np.asarray(candidate, float), None if candidate_rounds is None
                  else np.asarray(candidate_rounds))
    ratio = float(np.median(cand) / np.median(base))
    rng = np.random.default_rng(seed)
    med_b = np.median(rng.choice(base, (resamples, len(base))), axis=1)
    med_c = np.median(rng.choice(cand, (resamples, len(cand))), axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(med_c / med_b, [tail, 1 - tail])
    return ratio, float(low), float(high)


def _list(row: pd.Series, column: str) -> np.ndarray | None:
    value = row.get(column)
    if value is None or (np.isscalar(value) and pd.isna(value)) or not len(value):
        return None
    return np.asarray(value)


def _passes(row: pd.Series, side: str, clock: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One side's pass times and the timing round of each (results from before
    repetitions: the single time; from before rounds: None)."""
    runs = _list(row, f"certify{'_cpu' if clock == 'cpu' else ''}_runs_s_{side}")
    if runs is not None:
        rounds = _list(row, f"certify_run_rounds_{side}")
        return runs.astype(float), rounds if rounds is not None and len(rounds) == len(runs) \
            else None
    if clock == "cpu":
        return np.asarray([row.get(f"certify_cpu_s_{side}", np.nan)], float), None
    return np.asarray([row[f"certify_s_{side}"]], float), None


def compare(
    baseline: str | Path, candidate: str | Path, max_slowdown: float | None = None,
    max_acc_drop: float | None = None, fail_on_missing: bool = False,
    time_floor_s: float = 0.0, rule: str = "interval", confidence: float = 0.95,
    clock: str = "wall",
) -> Comparison:
    if rule not in RULES or clock not in CLOCKS:
        raise UserError(f"rule must be one of {RULES} and clock one of {CLOCKS}")
    if not 0 < confidence < 1:
        raise UserError("confidence must lie strictly between 0 and 1 (e.g. 0.95)")
    base_view, cand_view = _load(baseline), _load(candidate)
    columns = MATCH + ["cell_key", "checkpoint_sha256", "status", "per_sample_s",
                       "certify_s", "certify_cpu_s", "certify_runs_s", "certify_cpu_runs_s",
                       "certify_run_rounds", "soundness_violations"]
    base = base_view.cells.reindex(columns=columns)
    cand = cand_view.cells.reindex(columns=columns)
    merged = base.merge(cand, on=MATCH, how="outer", suffixes=("_base", "_cand"),
                        indicator=True)
    only_base = merged[merged["_merge"] == "left_only"][MATCH]
    only_cand = merged[merged["_merge"] == "right_only"][MATCH]
    both = merged[merged["_merge"] == "both"].copy()
    both["checkpoint"] = np.where(
        both["checkpoint_sha256_base"] == both["checkpoint_sha256_cand"], "same", "changed")
    intervals, passes, timed = [], [], []
    for _, row in both.iterrows():
        (b, b_rounds), (c, c_rounds) = _passes(row, "base", clock), _passes(row, "cand", clock)
        passes.append(f"{len(b)}/{len(c)}")
        ok = np.isfinite(b).all() and np.isfinite(c).all() and (b > 0).all() and (c > 0).all()
        intervals.append(ratio_interval(b, c, confidence, baseline_rounds=b_rounds,
                                        candidate_rounds=c_rounds) if ok else (np.nan,) * 3)
        timed.append(ok and max(np.median(b), np.median(c)) >= time_floor_s)
    both["passes"] = passes
    both[["time_ratio", "ratio_low", "ratio_high"]] = (
        np.array(intervals, float).reshape(-1, 3))
    both["cpu_ratio"] = both["certify_cpu_s_cand"] / both["certify_cpu_s_base"]
    drops, diffs = [], []
    for _, row in both.iterrows():
        diff = (cand_view.accuracy(row["cell_key_cand"])
                - base_view.accuracy(row["cell_key_base"])).dropna()
        diffs.append(", ".join(f"{e:g}:{d:+.3f}" for e, d in diff.items()) or "-")
        drops.append(max(0.0, float(-diff.min())) if len(diff) else float("nan"))
    both["acc_diff"] = diffs
    both["acc_drop"] = drops
    judged = both[np.array(timed, bool)]
    run_factor = float(np.exp(np.median(np.log(judged["time_ratio"])))) if len(judged) else (
        float("nan"))
    failures = []
    for (_, row), is_timed in zip(both.iterrows(), timed, strict=True):
        cell = f"{row['model']} / {row['verifier']} / l{row['norm']}"
        if row["status_base"] == "ok" and row["status_cand"] != "ok":
            failures.append(f"{cell}: status {row['status_cand']} (baseline ok)")
        evidence = row["ratio_low"] if rule == "interval" else row["time_ratio"]
        if max_slowdown is not None and is_timed and evidence > max_slowdown:
            failures.append(
                f"{cell}: {row['time_ratio']:.2f}x slower ({clock} clock), "
                f"{confidence:.0%} interval [{row['ratio_low']:.2f}, {row['ratio_high']:.2f}]"
                f"{' above' if rule == 'interval' else ', ratio above'} the limit "
                f"{max_slowdown:g}x")
        if max_acc_drop is not None and row["acc_drop"] > max_acc_drop + 1e-12:
            failures.append(f"{cell}: certified accuracy dropped by {row['acc_drop']:.4f} "
                            f"(limit {max_acc_drop:g})")
        if (row["soundness_violations_cand"] or 0) > 0:
            failures.append(f"{cell}: {int(row['soundness_violations_cand'])} soundness "
                            "violation(s) in the candidate")
    if fail_on_missing:
        failures += [f"only in baseline: {r.model} / {r.verifier} / l{r.norm}"
                     for r in only_base.itertuples()]
    table = both[MATCH[:3] + ["checkpoint", "status_base", "status_cand", "passes",
                              "per_sample_s_base", "per_sample_s_cand", "time_ratio",
                              "ratio_low", "ratio_high", "cpu_ratio", "acc_drop", "acc_diff"]]
    return Comparison(table.reset_index(drop=True), only_base, only_cand, failures, run_factor)


def format_comparison(result: Comparison) -> str:
    table = result.table.rename(columns={
        "per_sample_s_base": "s/sample base", "per_sample_s_cand": "s/sample cand",
        "status_base": "base", "status_cand": "cand", "ratio_low": "low",
        "ratio_high": "high"})
    parts = [table.to_string(index=False, float_format=lambda v: f"{v:.3g}")]
    for name, frame in (("only in baseline", result.only_baseline),
                        ("only in candidate", result.only_candidate)):
        for row in frame.itertuples():
            parts.append(f"{name}: {row.model} / {row.verifier} / l{row.norm}")
    if np.isfinite(result.run_factor):
        parts.append(f"run factor (median time ratio of the judged cells): "
                     f"{result.run_factor:.3f}x")
    parts += [f"FAIL {line}" for line in result.failures]
    parts.append("comparison passed" if result.passed else
                 f"comparison failed: {len(result.failures)} threshold(s) crossed")
    return "\n".join(parts)
