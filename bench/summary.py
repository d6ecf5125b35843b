"""The summary table that `certbench show` and `certbench run` print: one table per norm,
one row per cell, certified accuracy at each epsilon of that norm's grid, plus one row per
model with the PGD attack's upper bound; then soundness violations, if any, and failed
cells."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from certbench.errors import UserError
from certbench.store import ResultsStore


def summary_tables(results_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Per norm: model, verifier, clean and certified accuracy, times, memory, status."""
    store = ResultsStore(results_dir)
    if not store.path("cells").exists():
        raise UserError(
            f"no results in {results_dir} (expected cells.parquet); run `certbench run`"
        )
    return summary_of(store.read("cells"), store.read("certified"))


def summary_of(cells: pd.DataFrame, certified: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """`summary_tables` of the two tables given as frames."""
    tables = {}
    for norm, group in cells.groupby("norm", sort=True):
        table = group.set_index("cell_key")[["model", "verifier", "clean_acc"]].copy()
        if not certified.empty:
            acc = certified[certified["cell_key"].isin(group["cell_key"])].pivot(
                index="cell_key", columns="eps", values="certified_acc"
            )
            acc.columns = [f"cert@{eps:g}" for eps in acc.columns]
            table = table.join(acc)
        table["setup_s"] = group.set_index("cell_key")["setup_s"]
        table["ms/sample"] = group.set_index("cell_key")["per_sample_s"] * 1e3
        mem = group.set_index("cell_key")["peak_mem_bytes"].astype("float64") / 2**20
        table["peak_MiB"] = mem
        table["status"] = group.set_index("cell_key")["status"]
        if "soundness_violations" in group:
            indexed = group.set_index("cell_key")
            table["violations"] = indexed["soundness_violations"].fillna(
                indexed["probabilistic_violations"])
        probabilistic = group.set_index("cell_key")["probabilistic"].fillna(False).astype(bool)
        table.loc[probabilistic, "verifier"] = table.loc[probabilistic, "verifier"] + " (prob.)"
        rows = [table, *_attack_rows(group, certified)]
        table = pd.concat(rows) if len(rows) > 1 else table
        tables[str(norm)] = table.sort_values(["model", "verifier"]).reset_index(drop=True)
    return tables


ATTACK_ROW = "~ PGD upper bound"


def _attack_rows(group: pd.DataFrame, certified: pd.DataFrame) -> list[pd.DataFrame]:
    """One row per model: the attack's upper bound on robust accuracy at each epsilon."""
    if certified.empty or "attack_upper_bound" not in certified:
        return []
    rows = []
    deterministic = group[~group["probabilistic"].fillna(False).astype(bool)]
    for model, cells in deterministic.groupby("model"):
        bounds = certified[certified["cell_key"].isin(cells["cell_key"])].dropna(
            subset=["attack_upper_bound"])
        if bounds.empty:
            continue
        upper = bounds.groupby("eps")["attack_upper_bound"].first()
        row = {"model": model, "verifier": ATTACK_ROW, "clean_acc": cells["clean_acc"].iloc[0]}
        row.update({f"cert@{eps:g}": value for eps, value in upper.items()})
        rows.append(pd.DataFrame([row]))
    return rows


def violation_lines(cells: pd.DataFrame) -> list[str]:
    """One line per cell with soundness violations (and, apart, probabilistic ones)."""
    lines = []
    for column, what in (("soundness_violations", "SOUNDNESS VIOLATION"),
                         ("probabilistic_violations", "probabilistic certificate refuted")):
        if column not in cells:
            continue
        for _, row in cells[cells[column].fillna(0) > 0].iterrows():
            lines.append(f"{what}: {row['model']} / {row['verifier']} / l{row['norm']}: "
                         f"{int(row[column])} certified sample(s) attacked successfully")
    return lines


def format_summary(results_dir: str | Path) -> str:
    parts = []
    cells = ResultsStore(results_dir).read("cells")
    for norm, table in summary_tables(results_dir).items():
        parts.append(f"norm l{norm}  ({results_dir})")
        parts.append(table.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-"))
        parts.append("")
    if cells["probabilistic"].fillna(False).astype(bool).any():
        parts.append("(prob.): randomized smoothing, each certificate holds with probability "
                     "1 - alpha (alpha in the cells table)")
    if "soundness_violations" in cells and cells["soundness_violations"].notna().any():
        parts.append(f"{ATTACK_ROW}: robust accuracy upper bound from PGD (not a "
                     "certificate); violations: certified samples the attack flipped")
    parts += violation_lines(cells)
    failed = cells[cells["status"] != "ok"]
    for _, row in failed.iterrows():
        parts.append(f"{row['status']}: {row['model']} / {row['verifier']} / l{row['norm']}: "
                     f"{row['error']}")
    return "\n".join(parts).rstrip()
