"""One reading of a results folder, shared by `certbench show`, `report` and `compare` and
by the Python API's summary, so that they cannot disagree.

`ResultsView` holds the three tables (the per-sample one read only when asked for), with
``probabilistic`` as a boolean and ``shown``, the verifier's label with a dagger when its
certificates are probabilistic (randomized smoothing). `cell_table` is the per-cell table
every reader prints: verifier, clean accuracy, certified accuracy at each epsilon, setup
time, time per sample, peak memory, status and violations; `attack_row` adds the PGD
upper bound of a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from certbench.errors import UserError
from certbench.store import ResultsStore

PROB_MARK = "†"
PROB_NOTE = (f"{PROB_MARK} randomized smoothing: each certificate holds with probability "
             "1 - alpha over the sampling noise, not with certainty.")
ATTACK_ROW = "PGD upper bound"
WINNERS_NOTE = ("Per model, norm and epsilon: best, the highest certified accuracy of a "
                "deterministic verifier; winners, every verifier that reaches it, fastest first, "
                "and the first one's ms/sample; fastest within 0.01, the fastest verifier at most "
                "one point below the best, and its ms/sample; smoothing" + PROB_MARK + ", the best "
                "probabilistic certificate, kept apart.")


def eps_label(eps: float) -> str:
    """An epsilon as people write it: its decimal form when four digits hold it, else k/255
    where it is one (l_inf on 8-bit images: 1/255 rather than 0.00392157)."""
    k = round(eps * 255)
    if float(f"{eps:.4g}") != eps and 0 < k < 255 and abs(eps * 255 - k) < 1e-6 * k:
        return f"{k}/255"
    return f"{eps:g}"


@dataclass
class ResultsView:
    cells: pd.DataFrame
    certified: pd.DataFrame
    folder: Path | None = None
    _samples: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        cells = self.cells.copy()
        cells["probabilistic"] = cells["probabilistic"].fillna(False).astype(bool)
        cells["shown"] = cells["verifier"] + np.where(cells["probabilistic"], PROB_MARK, "")
        self.cells = cells

    @classmethod
    def load(cls, folder: str | Path) -> ResultsView:
        store = ResultsStore(folder)
        if not store.path("cells").exists():
            raise UserError(f"no results in {folder} (expected cells.parquet); run "
                            "`certbench run` first")
        return cls(store.read("cells"), store.read("certified"), Path(folder))

    @classmethod
    def of(cls, cells: pd.DataFrame, certified: pd.DataFrame,
           samples: pd.DataFrame | None = None) -> ResultsView:
        """A view of tables held in memory (the Python API's)."""
        return cls(cells, certified, None, samples)

    @property
    def samples(self) -> pd.DataFrame:
        if self._samples is None:
            self._samples = (ResultsStore(self.folder).read("samples") if self.folder
                             else pd.DataFrame())
        return self._samples

    @property
    def ok(self) -> pd.DataFrame:
        return self.cells[self.cells["status"] == "ok"]

    def accuracy(self, cell_key: str) -> pd.Series:
        """Certified accuracy of one cell by epsilon."""
        rows = self.certified[self.certified["cell_key"] == cell_key]
        return rows.set_index("eps")["certified_acc"]

    def cell_table(self, cells: pd.DataFrame) -> pd.DataFrame:
        """One row per cell of ``cells`` (a slice of ``self.cells``), indexed by key."""
        indexed = cells.set_index("cell_key")
        table = indexed[["shown", "clean_acc"]].rename(
            columns={"shown": "verifier", "clean_acc": "clean"})
        acc = self.certified[self.certified["cell_key"].isin(cells["cell_key"])]
        if not acc.empty:
            wide = acc.pivot(index="cell_key", columns="eps", values="certified_acc")
            wide.columns = [f"cert@{eps_label(e)}" for e in wide.columns]
            table = table.join(wide)
        table["setup_s"] = indexed["setup_s"]
        table["ms/sample"] = indexed["per_sample_s"] * 1e3
        if "certify_iqr_s" in indexed:  # the timed passes' spread: IQR over median
            table["iqr%"] = 100 * indexed["certify_iqr_s"] / indexed["certify_s"]
        table["peak_MiB"] = indexed["peak_mem_bytes"].astype("float64") / 2**20
        table["status"] = indexed["status"]
        if "soundness_violations" in indexed:
            table["violations"] = indexed["soundness_violations"].fillna(
                indexed["probabilistic_violations"])
        return table

    def attack_row(self, cells: pd.DataFrame) -> pd.DataFrame | None:
        """The PGD upper bound on robust accuracy at each epsilon, over the deterministic
        cells of one model in ``cells`` (all cells of a model share its attack)."""
        deterministic = cells[~cells["probabilistic"]]
        acc = self.certified[self.certified["cell_key"].isin(deterministic["cell_key"])]
        if acc.empty or "attack_upper_bound" not in acc:
            return None
        upper = acc.dropna(subset=["attack_upper_bound"]).groupby("eps")[
            "attack_upper_bound"].first()
        if upper.empty:
            return None
        row = {"verifier": ATTACK_ROW, "clean": deterministic["clean_acc"].iloc[0]}
        row.update({f"cert@{eps_label(e)}": v for e, v in upper.items()})
        return pd.DataFrame([row], index=["attack"])

    def winners(self) -> pd.DataFrame:
        """Who wins where (`WINNERS_NOTE`): one row per model, norm and epsilon."""
        columns = ["cell_key", "model", "norm", "shown", "probabilistic", "per_sample_s"]
        data = self.certified.merge(self.ok[columns], on="cell_key")
        rows = []
        for (model, norm, eps), group in data.groupby(["model", "norm", "eps"], sort=True):
            row = {"model": model, "norm": norm, "eps": eps_label(eps)}
            exact = group[~group["probabilistic"]].sort_values("per_sample_s", kind="stable")
            if len(exact) and exact["certified_acc"].max() == 0:
                row.update({"best": 0.0, "winners": "none certifies a sample"})
            elif len(exact):
                best = exact["certified_acc"].max()
                top = exact[exact["certified_acc"] >= best]
                near = exact[exact["certified_acc"] >= best - 0.01].iloc[0]
                row.update({"best": best, "winners": ", ".join(top["shown"]),
                            "ms/sample": top["per_sample_s"].iloc[0] * 1e3,
                            "fastest within 0.01": near["shown"],
                            "its ms/sample": near["per_sample_s"] * 1e3})
            smoothed = group[group["probabilistic"]]
            if len(smoothed):
                row["smoothing" + PROB_MARK] = smoothed["certified_acc"].max()
            rows.append(row)
        return pd.DataFrame(rows)

    def violation_lines(self) -> list[str]:
        """One line per cell with soundness violations (and, apart, probabilistic ones)."""
        lines = []
        for column, what in (("soundness_violations", "SOUNDNESS VIOLATION"),
                             ("probabilistic_violations", "probabilistic certificate refuted")):
            if column in self.cells:
                bad = self.cells[self.cells[column].fillna(0) > 0]
                lines += [f"{what}: {r.model} / {r.shown} / l{r.norm}: {int(r[column])} "
                          "certified sample(s) flipped by the attack" for _, r in bad.iterrows()]
        return lines

    def unchecked_lines(self) -> list[str]:
        """One line per (model, norm) whose PGD attack did not finish, so that its cells'
        certificates went without the soundness cross-check."""
        if "attack_error" not in self.cells:
            return []
        unchecked = self.cells[(self.cells["status"] == "ok") & self.cells["attack_error"].notna()]
        return [f"NOT CROSS-CHECKED: {model} / l{norm}: the PGD attack did not finish "
                f"({group['attack_error'].iloc[0]}); its {len(group)} cell(s) are certified "
                "but unchecked; rerun (with a longer --timeout) to retry the attack"
                for (model, norm), group in unchecked.groupby(["model", "norm"])]

    def failure_lines(self) -> list[str]:
        failed = self.cells[self.cells["status"] != "ok"]
        return [f"{r.status}: {r.model} / {r.shown} / l{r.norm}: {r.error}"
                for r in failed.itertuples()]
