"""Runs a matrix: models are loaded (or trained), the cells are built as values
(cells.py), the PGD attacks they share run first, then the cells, through an executor
(executors.py: worker processes by default, Ray for many machines); the driver writes each
cell's rows to the store as it ends.

A cell is (model, verifier with its options, norm, epsilon grid, sample set, device); its
key hashes all of that plus the checkpoint's sha256 (docs/architecture.md). A cell whose key is in
the store with status ``ok`` is skipped unless ``force``; a cell that fails (``error``,
``timeout``, ``oom``) is stored with its status and reason, and the run goes on. Its limits:
``timeout_s`` (the verifier's, else the matrix's; the wall clock of the cell's worker:
setup, warm-up, certification and cross-check; the attack of the model has its own run
under the matrix's ``timeout_s``) and the executor's memory limit. A failed attack leaves
its cells without the cross-check, with the reason in ``attack_error``.

With ``[timing] rounds`` > 1 (matrix.py, `TimingSpec`), the cells' later timing rounds run
after every cell has run, round by round (each finished cell once per round, in a fresh
worker: `cells.TimingRound`), so that each cell's passes are spread over the run; each
round's passes are merged into the cell's row as it ends (`run_timing_rounds`). A run
killed during the rounds resumes with the missing ones. A failed timing round (timeout,
crash) leaves the certificates as they are and the row with fewer rounds; it is named in
the log and retried by the next run.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from certbench.data import eval_indices, load_dataset
from certbench.errors import UserError
from certbench.matrix import MatrixSpec
from certbench.provenance import canonical_json, git_commit, library_versions
from certbench.run.cells import (
    AttackJob,
    Cell,
    Points,
    TimingRound,
    add_timing_round,
    build_cells,
)
from certbench.run.executors import Executor, InlineExecutor, Outcome, ProcessExecutor
from certbench.run.provision import ensure_models
from certbench.store import ResultsStore


def run_cells(
    cells: list[Cell], executor: Executor, store: ResultsStore | None, context: dict[str, Any],
    progress: bool = True, desc: str = "run", attack_timeout_s: float | None = None,
) -> dict[str, list[pd.DataFrame]]:
    """Attack each (model, norm) the cells need, then run the cells, all through
    ``executor``; each cell's rows (with ``context``) go to ``store`` as it ends, and are
    returned by table. An attack serves every cell of its (model, norm), so it may run
    ``attack_timeout_s`` (a cell's limit) times the number of those cells; a cell whose
    attack failed keeps the reason in ``attack_error`` and is rerun by the next run."""
    context = dict(context, executor=executor.name)
    jobs: dict[tuple[int, str], AttackJob] = {}
    sharing = Counter((id(cell.model), cell.norm) for cell in cells if cell.attack.enabled)
    for cell in cells:
        if cell.attack.enabled and (id(cell.model), cell.norm) not in jobs:
            limit = None if attack_timeout_s is None else (
                attack_timeout_s * sharing[id(cell.model), cell.norm])
            jobs[id(cell.model), cell.norm] = AttackJob(
                f"attack {cell.identity.get('model')} l{cell.norm}", cell.model, cell.x,
                cell.eps, cell.norm, cell.attack, cell.seed, cell.batch_size, cell.device,
                limit, cell.imports)
    bar = tqdm(total=len(cells), desc=desc, unit="cell", disable=not progress)
    outcomes: dict[tuple[int, str], Outcome] = {}
    if jobs:
        bar.set_postfix_str(f"{len(jobs)} attack(s)")
        by_job = {id(job): key for key, job in jobs.items()}
        for job, outcome in executor.run(list(jobs.values())):
            outcomes[by_job[id(job)]] = outcome
    rows: dict[str, list[pd.DataFrame]] = {"cells": [], "certified": [], "samples": []}
    ready, attack_errors = [], {}
    for cell in cells:
        attack = outcomes.get((id(cell.model), cell.norm))
        ok = attack is not None and attack.status == "ok"
        ready.append(replace(cell, cross_check=attack.value if ok else None))
        if attack is not None and not ok:
            attack_errors[id(ready[-1])] = f"{attack.status}: {attack.reason}"
    for cell, outcome in executor.run(ready):
        bar.set_postfix_str(f"{cell.label}: {outcome.status}")
        if outcome.status == "ok":
            tables = outcome.value
        else:
            started = pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=outcome.seconds)
            tables = cell.failed(outcome.status, outcome.reason or "", started)
        tables["cells"] = tables["cells"].assign(attack_error=attack_errors.get(id(cell)),
                                                 **context)
        if store is not None:
            store.write_cell(tables)
        for name, frame in tables.items():
            rows[name].append(frame)
        bar.update()
    bar.close()
    return rows


def run_timing_rounds(
    cells: list[Cell], rows: dict[str, dict[str, Any]], executor: Executor,
    store: ResultsStore | None, progress: bool = True, log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """The missing timing rounds of every cell whose row in ``rows`` (by cell key) is
    ``ok``: round r of all cells, then round r + 1, up to each cell's ``timing.rounds``.
    Returns ``rows`` with the passes merged; each merged row also goes to ``store``."""
    def done(cell: Cell) -> int:
        row = rows.get(cell.key)
        if row is None or row.get("status") != "ok":
            return cell.timing.rounds
        rounds = row.get("certify_rounds")
        return 1 if rounds is None or pd.isna(rounds) else int(rounds)

    missing = sum(max(0, c.timing.rounds - done(c)) for c in cells)
    if not missing:
        return rows
    bar = tqdm(total=missing, desc="timing rounds", unit="cell", disable=not progress)
    for round_ in range(1, max(c.timing.rounds for c in cells)):
        tasks = [TimingRound(c, round_) for c in cells if done(c) == round_ < c.timing.rounds]
        for task, outcome in executor.run(tasks):
            bar.update()
            if outcome.status != "ok":
                log(f"{task.label}: {outcome.status} ({outcome.reason}); its rows keep "
                    f"{round_} round(s), the next run retries")
                continue
            row = add_timing_round(rows[task.cell.key], round_, *outcome.value)
            rows[task.cell.key] = row
            if store is not None:
                store.write_cell({"cells": pd.DataFrame([row])})
    bar.close()
    return rows


def run_matrix(
    spec: MatrixSpec,
    results_dir: Path,
    checkpoint_dir: Path,
    data_dir: Path | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    matrix_file: str | None = None,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Run every cell of ``spec`` through ``executor`` (a `ProcessExecutor` by default);
    returns the per-cell rows of the whole results folder. ``matrix_file`` (where the spec
    was read from) is recorded in every cell row."""
    executor = executor or ProcessExecutor()
    device = executor.resolve_device(spec.device)
    dataset = load_dataset(spec.dataset, data_dir, download=spec.download)
    indices = eval_indices(len(dataset.y_test), spec.samples, spec.seed)
    x, y = dataset.x_test[indices], dataset.y_test[indices]
    store = ResultsStore(results_dir)
    done = set() if force else store.done_keys()
    context = {
        "run_id": time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
        "versions": canonical_json(library_versions()), "git_commit": git_commit(),
        "matrix": spec.name, "matrix_file": matrix_file
    }
    models = ensure_models(spec, dataset, checkpoint_dir, device, executor, progress, data_dir)
    models = [replace(subject, norms=m.norms and tuple(m.norms),
                      eps=m.eps and {norm: tuple(grid) for norm, grid in m.eps.items()},
                      verifiers=m.verifiers and tuple(m.verifiers),
                      attack=m.attack_for(spec.attack))
              for subject, m in zip(models, spec.models, strict=True)]
    points = Points(x, y, indices, {"dataset": spec.dataset, "samples": spec.samples,
                                    "seed": spec.seed})
    cells = build_cells(models, spec.verifiers, spec, points, dataset=spec.dataset,
                        device=str(device), timeout_s=spec.timeout_s,
                        imports=tuple(spec.imports))
    todo = [cell for cell in cells if cell.key not in done]
    run_cells(todo, executor, store, context, progress, f"run {spec.name}", spec.timeout_s)
    if spec.timing.rounds > 1:
        stored = store.read("cells")
        rows = {row["cell_key"]: row for row in stored.to_dict("records")}
        run_timing_rounds(cells, rows, executor, store, progress, log)
    log(f"{len(todo)} cell(s) run, {len(cells) - len(todo)} already done (use --force to "
        f"recompute) -> {results_dir}")
    return store.read("cells")


def make_executor(name: str, workers: int = 1, address: str | None = None,
                  memory_limit_gb: float | None = None) -> Executor:
    """The executor ``name`` (``process``, ``inline`` or ``ray``)."""
    limit = None if memory_limit_gb is None else int(memory_limit_gb * 2**30)
    if name == "process":
        return ProcessExecutor(workers, memory_limit_bytes=limit)
    if name == "inline":
        if workers != 1:
            raise UserError("--workers needs the process or ray executor")
        return InlineExecutor()
    if name == "ray":
        from certbench.run.ray_executor import RayExecutor  # Ray is an optional extra

        return RayExecutor(address, workers=workers, memory_limit_bytes=limit)
    raise UserError(f"unknown executor {name!r}; use process, inline or ray")
