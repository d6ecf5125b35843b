"""`certbench compare BASELINE CANDIDATE`: two results folders, cell by cell.

Cells are matched by (model, verifier with its options, norm, dataset, number of samples),
not by cell key, so that a candidate with retrained models or another commit still lines
up; a changed checkpoint is flagged in the ``checkpoint`` column. Per matched cell:
``time_ratio`` = candidate / baseline time per sample, and per epsilon the certified
accuracy difference (candidate - baseline); ``acc_drop`` is the largest drop over the
epsilons both sides have.

A threshold is crossed when ``time_ratio > max_slowdown``, ``acc_drop > max_acc_drop``,
a cell that was ``ok`` in the baseline is not ``ok`` in the candidate, or the candidate
has soundness violations; `certbench compare` then exits with code 1, so it can gate a CI
job. Cells present on one side only are listed, never dropped silently; they do not fail
the comparison unless ``fail_on_missing``.

Timing noise: two identical runs of the ``quick`` matrix on a 2-core CPU gave time ratios
from 0.46x to 1.81x over all 96 cells, and from 0.71x to 1.23x over the cells whose
certification took at least 0.5 s (sub-millisecond cells are dominated by noise). Hence
``time_floor_s``: a cell whose certification took less than that on both sides is shown
but never fails on time; and pick ``max_slowdown`` above the noise of your machine
(1.3 with a 0.5 s floor there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from certbench.errors import UserError
from certbench.view import ResultsView

MATCH = ["model", "verifier", "norm", "dataset", "n_samples"]


@dataclass
class Comparison:
    table: pd.DataFrame
    only_baseline: pd.DataFrame
    only_candidate: pd.DataFrame
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def _load(folder: str | Path) -> ResultsView:
    view = ResultsView.load(folder)
    if view.cells.duplicated(MATCH).any():
        raise UserError(f"{folder}: two cells share model, verifier and norm (several "
                        "matrices or devices in one folder); compare one matrix at a time")
    return view


def compare(
    baseline: str | Path, candidate: str | Path, max_slowdown: float | None = None,
    max_acc_drop: float | None = None, fail_on_missing: bool = False,
    time_floor_s: float = 0.5,
) -> Comparison:
    base_view, cand_view = _load(baseline), _load(candidate)
    columns = MATCH + ["cell_key", "checkpoint_sha256", "status", "per_sample_s",
                       "certify_s", "soundness_violations"]
    base = base_view.cells.reindex(columns=columns)
    cand = cand_view.cells.reindex(columns=columns)
    merged = base.merge(cand, on=MATCH, how="outer", suffixes=("_base", "_cand"),
                        indicator=True)
    only_base = merged[merged["_merge"] == "left_only"][MATCH]
    only_cand = merged[merged["_merge"] == "right_only"][MATCH]
    both = merged[merged["_merge"] == "both"].copy()
    both["checkpoint"] = np.where(
        both["checkpoint_sha256_base"] == both["checkpoint_sha256_cand"], "same", "changed")
    both["time_ratio"] = both["per_sample_s_cand"] / both["per_sample_s_base"]
    drops, diffs = [], []
    for _, row in both.iterrows():
        diff = (cand_view.accuracy(row["cell_key_cand"])
                - base_view.accuracy(row["cell_key_base"])).dropna()
        diffs.append(", ".join(f"{e:g}:{d:+.3f}" for e, d in diff.items()) or "-")
        drops.append(max(0.0, float(-diff.min())) if len(diff) else float("nan"))
    both["acc_diff"] = diffs
    both["acc_drop"] = drops
    failures = []
    for _, row in both.iterrows():
        cell = f"{row['model']} / {row['verifier']} / l{row['norm']}"
        if row["status_base"] == "ok" and row["status_cand"] != "ok":
            failures.append(f"{cell}: status {row['status_cand']} (baseline ok)")
        timed = max(row["certify_s_base"], row["certify_s_cand"]) >= time_floor_s
        if max_slowdown is not None and timed and row["time_ratio"] > max_slowdown:
            failures.append(f"{cell}: {row['time_ratio']:.2f}x slower per sample "
                            f"(limit {max_slowdown:g}x)")
        if max_acc_drop is not None and row["acc_drop"] > max_acc_drop + 1e-12:
            failures.append(f"{cell}: certified accuracy dropped by {row['acc_drop']:.4f} "
                            f"(limit {max_acc_drop:g})")
        if (row["soundness_violations_cand"] or 0) > 0:
            failures.append(f"{cell}: {int(row['soundness_violations_cand'])} soundness "
                            "violation(s) in the candidate")
    if fail_on_missing:
        failures += [f"only in baseline: {r.model} / {r.verifier} / l{r.norm}"
                     for r in only_base.itertuples()]
    table = both[MATCH[:3] + ["checkpoint", "status_base", "status_cand", "per_sample_s_base",
                              "per_sample_s_cand", "time_ratio", "acc_drop", "acc_diff"]]
    return Comparison(table.reset_index(drop=True), only_base, only_cand, failures)


def format_comparison(result: Comparison) -> str:
    table = result.table.rename(columns={
        "per_sample_s_base": "s/sample base", "per_sample_s_cand": "s/sample cand",
        "status_base": "base", "status_cand": "cand"})
    parts = [table.to_string(index=False, float_format=lambda v: f"{v:.3g}")]
    for name, frame in (("only in baseline", result.only_baseline),
                        ("only in candidate", result.only_candidate)):
        for row in frame.itertuples():
            parts.append(f"{name}: {row.model} / {row.verifier} / l{row.norm}")
    parts += [f"FAIL {line}" for line in result.failures]
    parts.append("comparison passed" if result.passed else
                 f"comparison failed: {len(result.failures)} threshold(s) crossed")
    return "\n".join(parts)
