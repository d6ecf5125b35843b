"""Building a zoo network (`certbench.zoo`): train its catalogue entry with
`train.train_model` (resumable from the resume point `training.resume` keeps next to the
weights until the last epoch), then certify it on the test set through `certbench.evaluate`, with
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

from certbench import zoo
from certbench.api import evaluate
from certbench.atomic import write_atomic
from certbench.data import Dataset, load_dataset
from certbench.errors import UserError
from certbench.models import checkpoint_paths, load_checkpoint
from certbench.provenance import git_commit
from certbench.training.resume import finished_epochs
from certbench.training.train import train_model
from certbench.zoo import ZooEntry


def hardware(card: dict[str, Any]) -> str:
    """The machine a card's network was trained on, in words: the GPU its versions record,
    else this machine's CPU (`build` asks only where it trained the network, or where the
    card has no record)."""
    if str(card.get("train_device", "cpu")).startswith("cuda"):
        return card.get("versions", {}).get("gpu", "a CUDA GPU")
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def status(name: str, epochs: int | None) -> str:
    """``built`` (a card with certbench's figures), ``measuring`` (weights, no figures yet),
    ``training N/epochs`` (a resume point after N epochs) or ``not built``."""
    if (found := zoo.card(name)) is not None:
        return "built" if "zoo" in found else "measuring"
    done = finished_epochs(zoo.FOLDER / f"{name}.safetensors")
    return "not built" if done is None else f"training {done}/{epochs or '?'}"


def build(name: str, data_dir: str | Path | None = None, device: str = "cpu",
          progress: bool = True) -> dict[str, Any]:
    """Train ``name`` (resuming an interrupted run) unless its weights exist, then certify
    it as its entry says and write the figures into its card's ``zoo`` section. Raises
    UserError if PGD breaks one of its certificates (an unsound bound: never committed)."""
    entry = zoo.catalog().get(name)
    if entry is None:
        raise UserError(f"no zoo network {name!r}; the zoo has: {', '.join(zoo.catalog())}")
    dataset = load_dataset(entry.dataset, data_dir)
    zoo.FOLDER.mkdir(parents=True, exist_ok=True)
    weights, card_path = checkpoint_paths(zoo.FOLDER / name)
    trained_here = not weights.exists()
    if trained_here:
        train_model(zoo.FOLDER / name, dataset, entry.arch, entry.arch_args, entry.recipe,
                    entry.recipe_args, entry.seed, device, progress)
    model, found = load_checkpoint(zoo.FOLDER / name)
    recorded = found.get("zoo", {}).get("train_hardware")
    found["zoo"] = {"paper": entry.paper.model_dump(),
                    "train_hardware": hardware(found) if trained_here or not recorded
                    else recorded,
                    **measure(model, entry, dataset, progress)}
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
                      attack=entry.measure.attack or True, name=entry.name,
                      dataset=entry.dataset, progress=progress)
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
        **({"attack": entry.measure.attack} if entry.measure.attack else {}),
    }, "git_commit": git_commit()}
