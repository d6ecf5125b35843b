"""The Python API: certify your own network from a notebook, no TOML file.

    import certbench
    result = certbench.evaluate(model, x, y, verifiers=["crown", "alpha-crown"],
                                eps={"inf": [1 / 255, 2 / 255]})
    result.summary()["inf"]   # one row per verifier: accuracy per eps, time, memory
    result.winners()          # per model, norm and eps: the best verifier and the fastest
    result.samples            # the per-sample table of `certbench run`, as a DataFrame
    result.save("results/mine"); then `certbench report results/mine`

``model`` is an ``nn.Module`` mapping inputs in [0, 1] to logits (put any normalisation
inside it, so epsilon is in pixel space) or the path of an ONNX file (with
``normalization=(mean, std)`` if the network expects normalised inputs). Every
(verifier, norm) pair is one cell (`cells.Cell`) run by the same code as `certbench run`
(`runner.run_cells`): the same verifiers, timing, memory probe, PGD attack and soundness
cross-check, and the same three tables (README, "Outputs"). Cells run in this process
(`executors.InlineExecutor`: a notebook's model class cannot be imported by a worker); pass
``executor=ProcessExecutor()`` for time limits and per-cell memory when the model is an
importable class or an ONNX file.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from pydantic import ValidationError
from torch import nn

from certbench.errors import UserError
from certbench.io.onnx_import import as_classifier, load_onnx, read_onnx_bytes
from certbench.matrix import (
    AttackSpec,
    CellSettings,
    TimingSpec,
    VerifierSpec,
    check_verifiers,
    first_error,
)
from certbench.provenance import canonical_json, git_commit, library_versions
from certbench.report.summary import summary_of
from certbench.report.view import ResultsView
from certbench.run.cells import Points, Subject, build_cells
from certbench.run.executors import Executor, InlineExecutor
from certbench.run.runner import run_cells, run_timing_rounds
from certbench.store import ResultsStore


@dataclass
class Evaluation:
    """The three tables of a run (README, "Outputs"), as pandas DataFrames."""

    cells: pd.DataFrame
    certified: pd.DataFrame
    samples: pd.DataFrame

    def summary(self) -> dict[str, pd.DataFrame]:
        """The tables `certbench show` prints, by norm (``"2"``, ``"inf"``): one row per
        cell (and the PGD upper bound per model): clean and certified accuracy at each
        epsilon of that norm's grid, setup time, ms per sample, peak memory, status,
        soundness violations."""
        return summary_of(self._view())

    def winners(self) -> pd.DataFrame:
        """Who wins where: per model, norm and epsilon, the best certified accuracy, the
        verifiers that reach it and the fastest one within a point of it (the report's
        first table)."""
        return self._view().winners()

    def _view(self) -> ResultsView:
        return ResultsView.of(self.cells, self.certified, self.samples)

    def save(self, results_dir: str | Path) -> Path:
        """Write the tables to a results folder (merged with what is there, by cell key),
        for `certbench show`, `report` and `compare`."""
        store = ResultsStore(results_dir)
        for key in self.cells["cell_key"]:
            store.write_cell({name: frame[frame["cell_key"] == key]
                              for name, frame in self.tables().items()})
        return Path(results_dir)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"cells": self.cells, "certified": self.certified, "samples": self.samples}


def _verifier_specs(verifiers: Sequence[Any]) -> list[VerifierSpec]:
    """Names, (name, options) pairs or dicts as VerifierSpecs; UserError for an unknown
    name or option."""
    specs = []
    for item in verifiers:
        if isinstance(item, str):
            specs.append(VerifierSpec(name=item))
        elif isinstance(item, tuple) and len(item) == 2:
            specs.append(VerifierSpec(name=item[0], options=dict(item[1])))
        elif isinstance(item, dict):
            specs.append(VerifierSpec(**item))
        else:
            raise UserError(f"verifier {item!r}: give a name, (name, options) or a dict with "
                            "name, options and label")
    check_verifiers(specs, "evaluate: verifiers")
    return specs


def _weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def evaluate(
    model: nn.Module | str | Path,
    x: torch.Tensor,
    y: torch.Tensor,
    verifiers: Sequence[Any] = ("crown",),
    eps: Sequence[float] | dict[str, Sequence[float]] = (0.01,),
    norms: str | Sequence[str] = "inf",
    name: str = "model",
    attack: bool | dict[str, Any] = True,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    batch_size: int = 256,
    dataset: str = "user",
    progress: bool = True,
    executor: Executor | None = None,
    timing: dict[str, Any] | None = None,
) -> Evaluation:
    """Certify ``model`` on the points ``x`` (inputs in [0, 1], on the model's device) with
    labels ``y``, with every verifier (a name such as ``"crown"``, or ``(name, options)``)
    in every norm (``"inf"``, ``"2"``) at every epsilon (one grid, or one per norm as
    ``{"inf": [...], "2": [...]}``). ``attack``: PGD and the soundness cross-check (True,
    False, or the settings of a matrix's ``[attack]``); ``executor``: where cells run
    (default: this process); ``timing``: the settings of a matrix's ``[timing]`` (how
    often each cell's certification is timed). See the module docstring."""
    norms = [norms] if isinstance(norms, str) else list(norms)
    if isinstance(model, (str, Path)):
        network = load_onnx(model)
        mean, std = normalization if normalization is not None else (None, None)
        sha = hashlib.sha256(read_onnx_bytes(model)).hexdigest()
        model = as_classifier(network, tuple(x.shape[1:]), network.num_outputs, mean, std)
        card = {"arch": "onnx", "recipe": "external", "onnx": str(network.path)}
    else:
        if normalization is not None:
            raise UserError("normalization is for ONNX paths; put it inside your nn.Module")
        sha = _weights_sha256(model)
        card = {"arch": type(model).__name__, "recipe": "external"}
    model.eval()
    if len(x) != len(y):
        raise UserError(f"x has {len(x)} points but y has {len(y)} labels")
    if x.min() < 0 or x.max() > 1:
        raise UserError("inputs must lie in [0, 1] (epsilon is in pixel space); put "
                        "normalisation inside the model")
    attack_settings = attack if isinstance(attack, dict) else {"enabled": bool(attack)}
    try:
        settings = CellSettings(
            norms=norms, batch_size=batch_size, attack=AttackSpec(**attack_settings),
            eps=({str(k): list(v) for k, v in eps.items()} if isinstance(eps, dict)
                 else list(eps)),
            timing=TimingSpec(**(timing or {})))
    except ValidationError as exc:
        raise UserError(f"evaluate: {first_error(exc)}") from exc
    if settings.grid_problem():
        raise UserError(f"evaluate: {settings.grid_problem()}")
    specs = _verifier_specs(verifiers)
    context = {"run_id": time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
               "versions": canonical_json(library_versions()), "git_commit": git_commit(),
               "matrix": name, "matrix_file": "certbench.evaluate"}
    data_sha = hashlib.sha256(x.detach().cpu().numpy().tobytes() + y.cpu().numpy().tobytes())
    points = Points(x.cpu(), y.cpu(), torch.arange(len(x)),
                    {"dataset": dataset, "data": data_sha.hexdigest()})
    device = str(next(model.parameters()).device)
    cells = build_cells([Subject(name, model, card, sha)], specs, settings, points,
                        dataset=dataset, device=device)
    executor = executor or InlineExecutor()
    rows = run_cells(cells, executor, None, context, progress, f"evaluate {name}")
    if settings.timing.rounds > 1:
        by_key = {r["cell_key"]: r for f in rows["cells"] for r in f.to_dict("records")}
        by_key = run_timing_rounds(cells, by_key, executor, None, progress)
        rows["cells"] = [pd.DataFrame(list(by_key.values()))]
    return Evaluation(**{k: pd.concat(v, ignore_index=True) if v else pd.DataFrame()
                         for k, v in rows.items()})
