"""The summary table that `certbench show` and `certbench run` print: one table per norm,
one row per cell, certified accuracy at each epsilon of that norm's grid."""

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
    cells, certified = store.read("cells"), store.read("certified")
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
        probabilistic = group.set_index("cell_key")["probabilistic"].fillna(False).astype(bool)
        table.loc[probabilistic, "verifier"] = table.loc[probabilistic, "verifier"] + " (prob.)"
        tables[str(norm)] = table.sort_values(["model", "verifier"]).reset_index(drop=True)
    return tables


def format_summary(results_dir: str | Path) -> str:
    parts = []
    cells = ResultsStore(results_dir).read("cells")
    for norm, table in summary_tables(results_dir).items():
        parts.append(f"norm l{norm}  ({results_dir})")
        parts.append(table.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-"))
        parts.append("")
    failed = cells[cells["status"] != "ok"]
    for _, row in failed.iterrows():
        parts.append(f"{row['status']}: {row['model']} / {row['verifier']} / l{row['norm']}: "
                     f"{row['error']}")
    return "\n".join(parts).rstrip()
