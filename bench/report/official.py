"""certbench's VNN-COMP answers beside the competition's participants, scored by their rule.

The official results (`read_official`): one CSV per tool, ``<tool>.csv`` or
``<tool>/results.csv`` (the layout of the public repository
ChristopherBrix/vnncomp2022_results), rows ``benchmark,onnx,vnnlib,prepare_time,result,
run_time``; results are normalised as the competition's ``CSV_SUBSTITUTIONS`` do
(``holds``/``unsat`` -> unsat, ``violated``/``sat`` -> sat, ``run_instance_timeout`` ->
timeout, ``error_exit_code_*`` -> error, anything else unknown).

The truth of an instance (`truth`) is the participants' consensus: the answer, sat or
unsat, that more tools gave; ``disputed`` if as many said sat as unsat (nobody scores
there), ``-`` if nobody answered (every answer counts as correct). The competition decided
disagreements by checking the counterexamples, whose files are not read here; the
majority stands in for that check, so that one unsound participant does not take an
instance out of the scoring.

The 2022 score (``get_score`` in that repository's ``SCORING/process_results.py``): a
correct unsat or sat earns 10 points, a wrong one -100; among the correct answers on an
instance the fastest earns 2 more and the second fastest 1 more, times clamped to at least
1 s (``SCORING_MIN_TIME``) and within 0.2 s counted as equal. A tool's time on an instance
is its run time minus its overhead, the smallest run time of any instance it solved
(``single_result``); certbench's run time is its verification time plus its overhead
(loading, parsing, ``prepare``). Each benchmark's table also gives every tool's score as a
percentage of the best, as the competition ranked them. certbench's rows come from
another machine and, with ``--timeout-scale``, other timeouts: the time bonus compares
across hardware, the 10 / -100 points do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from certbench.errors import UserError
from certbench.store import instance_name

CORRECT, WRONG, FASTEST, SECOND = 10, -100, 2, 1
MIN_TIME_S, SAME_TIME_S = 1.0, 0.2
_WORDS = (("unsat", "unsat"), ("holds", "unsat"), ("sat", "sat"), ("violated", "sat"),
          ("run_instance_timeout", "timeout"), ("prepare_instance_timeout", "timeout"),
          ("timeout", "timeout"), ("error", "error"))
COLUMNS = ["benchmark", "onnx", "vnnlib", "prepare_time", "result", "run_time"]


def _word(result: str) -> str:
    result = str(result).strip().lower()
    return next((word for prefix, word in _WORDS if result.startswith(prefix)), "unknown")


def read_official(folder: str | Path) -> pd.DataFrame:
    """Every tool's rows: tool, benchmark, instance (certbench's ``onnx__vnnlib`` name),
    result (certbench's words) and run_time. UserError if the folder holds none."""
    folder = Path(folder)
    files = {p.stem: p for p in sorted(folder.glob("*.csv"))}
    files.update({p.parent.name: p for p in sorted(folder.glob("*/results.csv"))})
    if not folder.is_dir() or not files:
        raise UserError(f"--official {folder}: no <tool>.csv or <tool>/results.csv there; give "
                        "the folder of the competition's results (vnncomp2022_results)")
    tables = []
    for tool, path in files.items():
        table = pd.read_csv(path, header=None, names=COLUMNS, usecols=range(6))
        table["tool"] = tool
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    table["instance"] = [instance_name(o, v) for o, v in zip(table["onnx"], table["vnnlib"],
                                                             strict=True)]
    table["result"] = table["result"].map(_word)
    return table[["tool", "benchmark", "instance", "result", "run_time"]]


def truth(official: pd.DataFrame) -> pd.Series:
    """The participants' consensus per (benchmark, instance) (module docstring)."""
    def consensus(results: pd.Series) -> str:
        sat, unsat = int((results == "sat").sum()), int((results == "unsat").sum())
        return "-" if sat == unsat == 0 else "disputed" if sat == unsat else (
            "sat" if sat > unsat else "unsat")
    return official.groupby(["benchmark", "instance"])["result"].agg(consensus)


def _with_certbench(official: pd.DataFrame, ours: pd.DataFrame) -> pd.DataFrame:
    """Both sets of rows on certbench's instances, with each tool's time after overhead."""
    mine = ours.assign(tool="certbench " + ours["verifier"],
                       run_time=ours["time_s"] + ours["overhead_s"].fillna(0))
    keys = set(zip(ours["benchmark"], ours["instance"], strict=True))
    theirs = official[[k in keys for k in zip(official["benchmark"], official["instance"],
                                               strict=True)]]
    rows = pd.concat([theirs, mine[["tool", "benchmark", "instance", "result", "run_time"]]],
                     ignore_index=True)
    solved = rows[rows["result"].isin(["sat", "unsat"])]
    overhead = solved.groupby("tool")["run_time"].min()
    rows["time_s"] = (rows["run_time"] - rows["tool"].map(overhead).fillna(0)).clip(lower=0)
    return rows


def scored(official: pd.DataFrame, ours: pd.DataFrame) -> pd.DataFrame:
    """One row per tool and instance that certbench answered: result, time_s, truth,
    correct, wrong and the score of the competition's rule."""
    rows = _with_certbench(official, ours)
    consensus = truth(official)
    rows["truth"] = [consensus.get(k, "-") for k in zip(rows["benchmark"], rows["instance"],
                                                        strict=True)]
    answered = rows["result"].isin(["sat", "unsat"])
    rows["wrong"] = answered & rows["truth"].isin(["sat", "unsat"]) & (
        rows["result"] != rows["truth"])
    rows["correct"] = answered & ~rows["wrong"] & (rows["truth"] != "disputed")
    rows["score"] = np.where(rows["wrong"], WRONG, np.where(rows["correct"], CORRECT, 0))
    for _, group in rows[rows["correct"]].groupby(["benchmark", "instance"]):
        times = group["time_s"].clip(lower=MIN_TIME_S)
        ranked = sorted(times)
        for index, secs in times.items():
            if secs < ranked[0] + SAME_TIME_S:
                rows.loc[index, "score"] += FASTEST
            elif len(ranked) > 1 and secs < ranked[1] + SAME_TIME_S:
                rows.loc[index, "score"] += SECOND
    return rows


def score_table(official: pd.DataFrame, ours: pd.DataFrame) -> pd.DataFrame:
    """Per benchmark and tool: instances, solved, sat, unsat, wrong, score and its
    percentage of the benchmark's best, best first."""
    rows = scored(official, ours)
    table = rows.groupby(["benchmark", "tool"]).agg(
        instances=("instance", "nunique"), solved=("correct", "sum"),
        sat=("result", lambda r: int((r == "sat").sum())),
        unsat=("result", lambda r: int((r == "unsat").sum())),
        wrong=("wrong", "sum"), score=("score", "sum")).reset_index()
    best = table.groupby("benchmark")["score"].transform("max")
    table["percent_of_best"] = (100 * table["score"] / best.where(best > 0)).round(1)
    return table.sort_values(["benchmark", "score"], ascending=[True, False],
                             ignore_index=True)


def wrong_lines(official: pd.DataFrame, ours: pd.DataFrame) -> list[str]:
    """One line per certbench answer against the participants' consensus."""
    rows = scored(official, ours)
    mine = rows[rows["tool"].str.startswith("certbench ") & rows["wrong"]]
    return [f"WRONG against the competition's consensus: {r.tool} answered {r.result} on "
            f"{r.benchmark} / {r.instance} (consensus {r.truth})" for r in mine.itertuples()]
