"""Runs a matrix: models are loaded (or trained), the cells are built as values
(cells.py), the PGD attacks they share run first, then the cells, through an executor
(executors.py: worker processes by default, Ray for many machines); the driver writes each
cell's rows to the store as it ends.

A cell is (model, verifier with its options, norm, epsilon grid, sample set, device); its
key hashes all of that plus the checkpoint's sha256 (DESIGN.md). A cell whose key is in
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

import hashlib
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from certbench.cells import AttackJob, Cell, TimingRound, add_timing_round, cell_identity
from certbench.data import Dataset, default_data_dir, eval_indices, load_dataset
from certbench.errors import UserError
from certbench.executors import Outcome, ProcessExecutor
from certbench.matrix import MatrixSpec, ModelSpec, VerifierSpec, canonical_json
from certbench.models import checkpoint_paths, file_sha256, load_checkpoint
from certbench.onnx_import import as_classifier, load_onnx, read_onnx_bytes
from certbench.provenance import git_commit, library_versions
from certbench.store import ResultsStore
from certbench.train import recipe_args, train_model


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: nn.Module
    card: dict[str, Any]
    sha256: str


def model_stem(spec: ModelSpec, dataset: str, checkpoint_dir: Path) -> Path:
    """Where a recipe's checkpoint lives: the name plus a hash of everything that shapes
    the trained weights, so that changing a hyperparameter trains a new model."""
    if spec.checkpoint is not None:
        return checkpoint_paths(spec.checkpoint)[0].with_suffix("")
    identity = {
        "dataset": dataset, "arch": spec.arch, "arch_args": spec.arch_args,
        "recipe": spec.recipe, "recipe_args": recipe_args(spec.recipe, spec.recipe_args),
        "seed": spec.seed,
    }
    digest = hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:10]
    return checkpoint_dir / f"{dataset}-{spec.name}-{digest}"


def onnx_path(spec: ModelSpec, data_dir: str | Path | None) -> Path:
    """An ONNX model's file: the path as given, else under the data directory."""
    path = Path(spec.onnx)
    if path.exists() or path.is_absolute():
        return path
    under_data = (Path(data_dir) if data_dir is not None else default_data_dir()) / path
    if under_data.exists() or Path(str(under_data) + ".gz").exists():
        return under_data
    raise UserError(f"model {spec.name!r}: ONNX file {path} not found (also looked in "
                    f"{under_data.parent}); check the path or --data-dir")


def load_onnx_model(spec: ModelSpec, dataset: Dataset, data_dir: str | Path | None,
                    device: torch.device) -> LoadedModel:
    """A third-party ONNX network as a classifier of the dataset (onnx_import.py). Its
    card records the file and the normalisation put in front; ``sha256`` is the file's."""
    path = onnx_path(spec, data_dir)
    norm = spec.normalization
    model = as_classifier(load_onnx(path), dataset.input_shape, dataset.num_classes,
                          norm.mean if norm else None, norm.std if norm else None)
    card = {"arch": "onnx", "recipe": "external", "onnx": str(path), "dataset": dataset.name,
            "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
            "normalization": norm.model_dump() if norm else None}
    return LoadedModel(spec, model.to(device), card, hashlib.sha256(
        read_onnx_bytes(path)).hexdigest())


@dataclass(frozen=True, eq=False)
class TrainJob:
    """A recipe model's training as a task, for executors on other machines: it trains
    into a temporary folder where it runs and returns the checkpoint's files
    (``.safetensors`` and ``.json``) for the driver to save. The worker needs the dataset
    (the same data folder, or ``download = true``)."""

    label: str
    spec: ModelSpec
    dataset: str
    data_dir: str | None
    download: bool
    device: str
    timeout_s: float | None = None

    def run(self) -> dict[str, bytes]:
        dataset = load_dataset(self.dataset, self.data_dir, download=self.download)
        with tempfile.TemporaryDirectory() as folder:
            stem = Path(folder) / "model"
            s = self.spec
            train_model(stem, dataset, s.arch, s.arch_args, s.recipe, s.recipe_args,
                        seed=s.seed, device=self.device, progress=False)
            return {path.suffix: path.read_bytes() for path in checkpoint_paths(stem)}


def _save_files(stem: Path, files: dict[str, bytes]) -> None:
    """Write a checkpoint's files (card last, each atomically)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        path = stem.with_name(stem.name + suffix)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(files[suffix])
        tmp.replace(path)


def ensure_models(
    spec: MatrixSpec, dataset: Dataset, checkpoint_dir: Path, device: torch.device,
    executor: Any, progress: bool, data_dir: str | Path | None = None,
) -> list[LoadedModel]:
    """Every model of the matrix on the CPU: checkpoints loaded, missing recipe models
    trained first (on ``device``; as tasks of a remote executor), ONNX files converted."""
    missing = [m for m in spec.models if m.onnx is None and m.checkpoint is None
               and not checkpoint_paths(model_stem(m, dataset.name, checkpoint_dir))[0].exists()]
    if missing and executor.remote:
        jobs = [TrainJob(f"train {m.name}", m, dataset.name,
                         None if data_dir is None else str(data_dir), spec.download, str(device))
                for m in missing]
        for job, outcome in tqdm(executor.run(jobs), total=len(jobs), desc="train",
                                 unit="model", disable=not progress):
            if outcome.status != "ok":
                raise UserError(f"model {job.spec.name!r}: training failed on the cluster "
                                f"({outcome.status}: {outcome.reason})")
            _save_files(model_stem(job.spec, dataset.name, checkpoint_dir), outcome.value)
    loaded = []
    for m in spec.models:
        if m.onnx is not None:
            loaded.append(load_onnx_model(m, dataset, data_dir, torch.device("cpu")))
            continue
        stem = model_stem(m, dataset.name, checkpoint_dir)
        if m in missing and not executor.remote:
            train_model(stem, dataset, m.arch, m.arch_args, m.recipe, m.recipe_args,
                        seed=m.seed, device=str(device), progress=progress)
        model, card = load_checkpoint(stem)
        if card.get("dataset") != dataset.name:
            raise UserError(
                f"model {m.name!r}: checkpoint {checkpoint_paths(stem)[0]} was trained on "
                f"{card.get('dataset')!r}, but the matrix dataset is {dataset.name!r}"
            )
        loaded.append(LoadedModel(m, model.eval(), card, file_sha256(checkpoint_paths(stem)[0])))
    return loaded


def cell_key(
    spec: MatrixSpec, loaded: LoadedModel, verifier: VerifierSpec, norm: str, device: torch.device
) -> str:
    identity = {
        "checkpoint_sha256": loaded.sha256, "verifier": verifier.name,
        "options": verifier.options, "norm": norm, "eps": spec.eps_for(norm),
        "dataset": spec.dataset, "samples": spec.samples, "seed": spec.seed,
        "device": device.type, "attack": spec.attack.model_dump(),
    }
    if loaded.card.get("normalization"):  # an ONNX network's input transform
        identity["normalization"] = loaded.card["normalization"]
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def run_cells(
    cells: list[Cell], executor: Any, store: ResultsStore | None, context: dict[str, Any],
    progress: bool = True, desc: str = "run", attack_timeout_s: float | None = None,
) -> dict[str, list[pd.DataFrame]]:
    """Attack each (model, norm) the cells need, then run the cells, all through
    ``executor``; each cell's rows (with ``context``) go to ``store`` as it ends, and are
    returned by table. An attack may run ``attack_timeout_s``."""
    context = dict(context, executor=executor.name)
    jobs: dict[tuple[int, str], AttackJob] = {}
    for cell in cells:
        if cell.attack.enabled and (id(cell.model), cell.norm) not in jobs:
            jobs[id(cell.model), cell.norm] = AttackJob(
                f"attack {cell.identity.get('model')} l{cell.norm}", cell.model, cell.x,
                cell.eps, cell.norm, cell.attack, cell.seed, cell.batch_size, cell.device,
                attack_timeout_s, cell.imports)
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
    cells: list[Cell], rows: dict[str, dict[str, Any]], executor: Any,
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
    executor: Any = None,
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
    cells = []
    for loaded in models:
        for verifier in spec.verifiers:
            for norm in spec.norms:
                key = cell_key(spec, loaded, verifier, norm, device)
                cells.append(Cell(
                    key, f"{loaded.spec.name} / {verifier.display} / l{norm}", loaded.model,
                    x, y, indices, verifier, norm, tuple(spec.eps_for(norm)), str(device),
                    spec.batch_size, spec.attack, spec.seed,
                    cell_identity(loaded.spec.name, spec.dataset, loaded.card, loaded.sha256,
                                  verifier, norm, str(device)),
                    timeout_s=verifier.timeout_s or spec.timeout_s,
                    imports=tuple(spec.imports), timing=spec.timing))
    todo = [cell for cell in cells if cell.key not in done]
    run_cells(todo, executor, store, context, progress, f"run {spec.name}", spec.timeout_s)
    if spec.timing.rounds > 1:
        stored = store.read("cells")
        rows = {row["cell_key"]: row for row in stored.to_dict("records")}
        run_timing_rounds(cells, rows, executor, store, progress, log)
    log(f"{len(todo)} cell(s) run, {len(cells) - len(todo)} already done (use --force to "
        f"recompute) -> {results_dir}")
    return store.read("cells")
