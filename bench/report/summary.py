"""The summary table that `certbench show` and `certbench run` print: one table per norm,
one row per cell (view.py's `cell_table`), certified accuracy at each epsilon of that
norm's grid, plus one row per model with the PGD attack's upper bound; then soundness
violations, if any, and failed cells. For `certbench vnncomp` results: instances per
answer, per benchmark and verifier."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from certbench.report.view import ATTACK_ROW, PROB_NOTE, ResultsView
from certbench.store import INSTANCES, ResultsStore


def summary_of(view: ResultsView) -> dict[str, pd.DataFrame]:
    """Per norm: model, verifier, clean and certified accuracy, times, memory, status."""
    tables = {}
    for norm, group in view.cells.groupby("norm", sort=True):
        table = view.cell_table(group)
        table.insert(0, "model", group.set_index("cell_key")["model"])
        rows = [table]
        for model, cells in group.groupby("model"):
            attack = view.attack_row(cells)
            if attack is not None:
                rows.append(attack.assign(model=model, verifier="~ " + ATTACK_ROW))
        table = pd.concat(rows) if len(rows) > 1 else table
        tables[str(norm)] = table.sort_values(["model", "verifier"]).reset_index(drop=True)
    return tables


def format_summary(results_dir: str | Path) -> str:
    view = ResultsView.load(results_dir)
    parts = []
    for norm, table in summary_of(view).items():
        parts.append(f"norm l{norm}  ({results_dir})")
        parts.append(table.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-"))
        parts.append("")
    if view.cells["probabilistic"].any():
        parts.append(PROB_NOTE)
    if "soundness_violations" in view.cells and view.cells["soundness_violations"].notna().any():
        parts.append(f"~ {ATTACK_ROW}: robust accuracy upper bound from PGD (not a "
                     "certificate); violations: certified samples the attack flipped")
    parts += view.violation_lines() + view.unchecked_lines() + view.failure_lines()
    return "\n".join(parts).rstrip()

ANSWERS = ("unsat", "sat", "unknown", "timeout", "error", "oom")


def solved_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per benchmark and verifier: instances per answer, the median verification time of
    the solved ones (unsat or sat), the median overhead and the (scaled) timeout."""
    counts = table.pivot_table(index=["benchmark", "verifier"], columns="result",
                               values="instance", aggfunc="count", fill_value=0)
    counts = counts.reindex(columns=list(ANSWERS), fill_value=0)
    solved = table[table["result"].isin(["unsat", "sat"])]
    counts["solved"] = counts["unsat"] + counts["sat"]
    counts["median_s (solved)"] = solved.groupby(["benchmark", "verifier"])["time_s"].median()
    counts["median_overhead_s"] = table.groupby(["benchmark", "verifier"])["overhead_s"].median()
    counts["timeout_s"] = table.groupby(["benchmark", "verifier"])["timeout_s"].max()
    return counts.reset_index()


def conflicts(table: pd.DataFrame) -> pd.DataFrame:
    """Instances where one verifier's accepted ``sat`` meets another's ``unsat``: one row
    each (benchmark, instance, sat_by, unsat_by, strict). ``strict``: some counterexample
    also passed the strict check, so a proof is refuted; otherwise the two answers are
    reconcilable only within the competition's tolerance, and the competition would still
    count one of them as wrong."""
    columns = ["benchmark", "instance", "sat_by", "unsat_by", "strict"]
    rows = []
    for (benchmark, instance), group in table.groupby(["benchmark", "instance"]):
        sat = group[group["result"] == "sat"]
        unsat = group[group["result"] == "unsat"]
        if len(sat) and len(unsat):
            strict = sat.get("confirmed_strict", pd.Series(False, index=sat.index))
            rows.append((benchmark, instance, ", ".join(sorted(sat["verifier"])),
                         ", ".join(sorted(unsat["verifier"])),
                         bool(strict.fillna(False).astype(bool).any())))
    return pd.DataFrame(rows, columns=columns)


def conflict_lines(table: pd.DataFrame) -> list[str]:
    """One line per conflicting instance (`conflicts`), for the terminal and the report."""
    return [f"SOUNDNESS CONFLICT: {row.benchmark} / {row.instance}: sat by {row.sat_by} "
            f"(counterexample {'strict' if row.strict else 'within tolerance only'}), unsat "
            f"by {row.unsat_by}" for row in conflicts(table).itertuples()]


def format_vnncomp(results_dir: str | Path) -> str:
    table = ResultsStore(results_dir).read(INSTANCES)
    summary = solved_table(table)
    lines = [f"VNN-COMP instances ({results_dir}): unsat = proved, sat = counterexample "
             "accepted by the competition's judge (onnxruntime, tolerance 1e-4)",
             summary.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-")]
    lines += conflict_lines(table)
    errors = table[table["result"] == "error"]
    for _, row in errors.head(10).iterrows():
        lines.append(f"error: {row['verifier']} / {row['instance']}: {row['error']}")
    return "\n".join(lines)
