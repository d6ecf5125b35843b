"""The summary table that `certbench show` and `certbench run` print: one table per norm,
one row per cell (view.py's `cell_table`), certified accuracy at each epsilon of that
norm's grid, plus one row per model with the PGD attack's upper bound; then soundness
violations, if any, and failed cells."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from certbench.view import ATTACK_ROW, PROB_NOTE, ResultsView


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
    parts += view.violation_lines() + view.failure_lines()
    return "\n".join(parts).rstrip()
