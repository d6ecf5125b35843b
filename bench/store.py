"""The results store: the Parquet tables of one results folder, written atomically.

    RESULTS_DIR/cells.parquet      one row per cell (identity, times, memory, status)
    RESULTS_DIR/certified.parquet  one row per cell and epsilon (certified accuracy)
    RESULTS_DIR/samples.parquet    one row per cell, sample and epsilon (verdicts)
    RESULTS_DIR/instances.parquet  one row per VNN-COMP instance and verifier (`certbench
                                   vnncomp`)

Each is read with ``pandas.read_parquet``. Rows are upserted by key (``cell_key``,
``instance_key``): writing a cell replaces any earlier rows of that key. Each table is
rewritten to a hidden temporary file and renamed over the old one (`atomic`), so a killed
run never leaves a half-written table. The per-cell table is written last: a cell counts
as done only once its row is there, and rows of a cell that was interrupted between
tables are replaced when it is rerun.
The tables are small (thousands of rows), so rewriting them whole is cheaper than keeping
an append log consistent.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from certbench.atomic import write_atomic
from certbench.errors import UserError

TABLES = ("samples", "certified", "cells")
INSTANCES = "instances"


def instance_name(onnx: str | Path, vnnlib: str | Path) -> str:
    """The ``instance`` key of the instances table: ``<onnx stem>__<vnnlib stem>`` (``.gz``,
    ``.onnx`` and ``.vnnlib`` dropped), as certbench and the competition's files name it."""
    def stem(path: str | Path) -> str:
        name = Path(str(path).strip()).name
        for suffix in (".gz", ".onnx", ".vnnlib"):
            name = name.removesuffix(suffix)
        return name
    return f"{stem(onnx)}__{stem(vnnlib)}"


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
        """Keys of cells that finished with status ``ok`` and, where their attack was on,
        with its cross-check (failed and unchecked cells are retried)."""
        cells = self.read("cells")
        if cells.empty:
            return set()
        done = cells["status"] == "ok"
        if "attack_error" in cells:
            done &= cells["attack_error"].isna()
        return set(cells.loc[done, "cell_key"])

    def write_cell(self, tables: dict[str, pd.DataFrame]) -> None:
        """Upsert one cell's rows in every table (``cells`` last), each atomically."""
        key = tables["cells"]["cell_key"].iloc[0]
        for table in TABLES:
            if tables.get(table) is not None:
                self._upsert(table, "cell_key", key, tables[table])

    def done_instances(self) -> set[str]:
        """Keys of VNN-COMP answers other than ``error`` and ``oom`` (those are retried)."""
        table = self.read(INSTANCES)
        return set() if table.empty else set(
            table.loc[~table["result"].isin(["error", "oom"]), "instance_key"])

    def write_instance(self, row: dict) -> pd.DataFrame:
        """Upsert one VNN-COMP answer; returns the whole instances table."""
        return self._upsert(INSTANCES, "instance_key", row["instance_key"], pd.DataFrame([row]))

    def _upsert(self, table: str, column: str, key: str, new: pd.DataFrame) -> pd.DataFrame:
        old = self.read(table)
        if not old.empty:
            old = old[old[column] != key]
        frames = [f for f in (old, new) if not f.empty]
        merged = pd.concat(frames, ignore_index=True) if frames else new
        write_atomic(self.path(table), lambda path: merged.to_parquet(path, index=False))
        return merged
