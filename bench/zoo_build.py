"""Building a zoo network (`certbench.zoo`): train its catalogue entry with
`train.train_model` (resumable: the training state waits next to the weights, git-ignored,
until the last epoch), then certify it on the test set through `certbench.evaluate`, with
the PGD cross-check every run has, and write the figures, the hardware and the git commit
into the card's ``zoo`` section. `certbench zoo --build NAME` calls `build`."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certbench.api import evaluate
from certbench.atomic import write_atomic
from certbench.data import Dataset, load_dataset
from certbench.errors import UserError
from certbench.models import checkpoint_paths, load_checkpoint
from certbench.provenance import git_commit
from certbench.training.train import train_model
from certbench.zoo import FOLDER, ZooEntry, catalog


def hardware(device: str) -> str:
    """The machine a network was trained on, in words."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build(name: str, data_dir: str | Path | None = None, device: str = "cpu",
          progress: bool = True) -> dict[str, Any]:
    """Train ``name`` (resuming an interrupted run) unless its weights exist, then certify
    it as its entry says and write the figures into its card's ``zoo`` section. Raises
    UserError if PGD breaks one of its certificates (an unsound bound: never committed)."""
    entry = catalog().get(name)
    if entry is None:
        raise UserError(f"no zoo network {name!r}; the zoo has: {', '.join(catalog())}")
    dataset = load_dataset(entry.dataset, data_dir)
    weights, card_path = checkpoint_paths(FOLDER / name)
    if not weights.exists():
        train_model(FOLDER / name, dataset, entry.arch, entry.arch_args, entry.recipe,
                    entry.recipe_args, entry.seed, device, progress)
    model, found = load_checkpoint(FOLDER / name)
    found["zoo"] = {"paper": entry.paper.model_dump(), "train_hardware": hardware(
        found.get("train_device", device)), **measure(model, entry, dataset, progress)}
    write_atomic(card_path, json.dumps(found, indent=2, sort_keys=True) + "\n")
    return found


def measure(model: nn.Module, entry: ZooEntry, dataset: Dataset,
            progress: bool = True) -> dict[str, Any]:
    """certbench's figure for ``entry``: its verifier at the paper's norm and epsilon on
    the first ``points`` test points, PGD's upper bound beside it."""
    points = min(entry.measure.points, len(dataset.y_test))
    x, y = dataset.x_test[:points], dataset.y_test[:points]
    began = time.perf_counter()
    result = evaluate(model, x, y, verifiers=[(entry.measure.verifier, entry.measure.options)],
                      eps={entry.paper.norm: [entry.paper.eps]}, norms=entry.paper.norm,
                      name=entry.name, dataset=entry.dataset, progress=progress)
    cell = result.cells.iloc[0]
    if cell["status"] != "ok":
        raise UserError(f"zoo network {entry.name}: certification ended {cell['status']}: "
                        f"{cell['error']}")
    violations = int(cell.get("soundness_violations", 0) or 0)
    if violations:
        raise UserError(f"zoo network {entry.name}: PGD broke {violations} certificate(s) of "
                        f"{entry.measure.verifier}: an unsound bound; do not commit it")
    row = result.certified.iloc[0]
    return {"measured": {
        "verifier": entry.measure.verifier, "options": entry.measure.options,
        "norm": entry.paper.norm, "eps": entry.paper.eps, "points": points,
        "clean_acc": float(cell["clean_acc"]), "certified_acc": float(row["certified_acc"]),
        "attack_upper_bound": float(row["attack_upper_bound"]),
        "soundness_violations": violations, "certify_s": round(time.perf_counter() - began, 2),
    }, "git_commit": git_commit()}
