"""The results store: three Parquet tables in one folder, written atomically.

    RESULTS_DIR/cells.parquet      one row per cell (identity, times, memory, status)
    RESULTS_DIR/certified.parquet  one row per cell and epsilon (certified accuracy)
    RESULTS_DIR/samples.parquet    one row per cell, sample and epsilon (verdicts)

Each is read with ``pandas.read_parquet``. Rows are upserted by ``cell_key``: writing a
cell replaces any earlier rows of that key. Each table is rewritten to a hidden temporary
file and renamed over the old one, so a killed run never leaves a half-written table. The
per-cell table is written last: a cell counts as done only once its row is there, and
rows of a cell that was interrupted between tables are replaced when it is rerun.
The tables are small (thousands of rows), so rewriting them whole is cheaper than keeping
an append log consistent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from certbench.errors import UserError

TABLES = ("samples", "certified", "cells")


class ResultsStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, table: str) -> Path:
        return self.folder / f"{table}.parquet"

    def read(self, table: str) -> pd.DataFrame:
        """The table, or an empty frame if nothing was written yet."""
        path = self.path(table)
        if not path.exists():
            return pd.DataFrame()
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(
                f"{path} is not a readable Parquet table ({exc}); move it away or choose "
                "another --results folder"
            ) from exc

    def done_keys(self) -> set[str]:
        """Keys of cells that finished with status ``ok`` (failed cells are retried)."""
        cells = self.read("cells")
        if cells.empty:
            return set()
        return set(cells.loc[cells["status"] == "ok", "cell_key"])

    def write_cell(self, tables: dict[str, pd.DataFrame]) -> None:
        """Upsert one cell's rows in every table (``cells`` last), each atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for table in TABLES:
            new = tables.get(table)
            if new is None:
                continue
            key = tables["cells"]["cell_key"].iloc[0]
            old = self.read(table)
            if not old.empty:
                old = old[old["cell_key"] != key]
            frames = [f for f in (old, new) if not f.empty]
            merged = pd.concat(frames, ignore_index=True) if frames else new
            tmp = self.folder / f".{table}.parquet.tmp"
            merged.to_parquet(tmp, index=False)
            os.replace(tmp, self.path(table))
