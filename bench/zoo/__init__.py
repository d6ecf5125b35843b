"""The zoo: networks trained by certbench's own recipes at their papers' settings and
committed with their model cards, so that a matrix compares networks of published
strength without training: ``checkpoint = "zoo:gloro-mnist-2c2f"`` in a matrix
(`network_stem` finds the files).

``catalog.toml`` holds one entry per network: the dataset, architecture, recipe with every
argument and seed (a comment cites the paper's table and reference code), the paper's
headline figure and the verifier that measures certbench's figure at the same epsilon.
`certbench.zoo_build` trains and certifies an entry; the figures go into the card's
``zoo`` section, which `listing` (`certbench zoo`) puts beside the paper's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from certbench.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PREFIX = "zoo:"
FOLDER = Path(__file__).resolve().parent / "networks"
CATALOG = Path(__file__).resolve().parent / "catalog.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PaperFigure(_Strict):
    """The paper's headline figure for this setting (fractions, not percent); no
    ``value`` where the paper gives none for this network (its twin's setting)."""

    source: str
    metric: Literal["VRA", "certified accuracy", "verified error"]
    value: float | None = None
    norm: Literal["2", "inf"]
    eps: float = Field(gt=0)
    clean: float | None = None


class Measurement(_Strict):
    """How certbench measures its figure: a verifier (with options) on the first
    ``points`` test points, at the paper's norm and epsilon; ``attack``: fields of a
    matrix's ``[attack]`` for the PGD cross-check (``{ bisection_steps = 0 }`` where the
    search for each point's smallest adversarial distance would take hours)."""

    verifier: str
    options: dict[str, Any] = {}
    points: int = Field(default=10000, gt=0)
    attack: dict[str, Any] = {}


class ZooEntry(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    dataset: str
    arch: str
    arch_args: dict[str, Any] = {}
    recipe: str
    recipe_args: dict[str, Any] = {}
    seed: int = 0
    paper: PaperFigure
    measure: Measurement


def catalog() -> dict[str, ZooEntry]:
    """The entries of ``catalog.toml`` by name."""
    entries = {}
    for i, raw in enumerate(tomllib.loads(CATALOG.read_text()).get("networks", [])):
        try:
            entry = ZooEntry(**raw)
        except ValidationError as exc:
            raise UserError(f"{CATALOG}: networks.{i}: {exc.errors()[0]['msg']}") from exc
        entries[entry.name] = entry
    return entries


def network_stem(reference: str) -> Path:
    """The checkpoint stem of ``zoo:NAME`` (or ``NAME``); UserError naming the known
    networks, or how to build one whose weights are not here."""
    name = reference.removeprefix(PREFIX)
    known = catalog()
    if name not in known:
        raise UserError(f"no zoo network {name!r}; the zoo has: {', '.join(known)} "
                        "(`certbench zoo` lists them)")
    stem = FOLDER / name
    if not stem.with_suffix(".safetensors").exists():
        raise UserError(f"zoo network {name!r} is catalogued but not built here; build it "
                        f"with `certbench zoo --build {name}`")
    return stem


def card(name: str) -> dict[str, Any] | None:
    """The model card of a built network, None if it is not built."""
    path = FOLDER / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def listing() -> list[dict[str, Any]]:
    """One row per catalogued network: its setting, the paper's figure and certbench's."""
    rows = []
    for name, entry in catalog().items():
        found = card(name) or {}
        measured = found.get("zoo", {}).get("measured", {})
        rows.append({
            "network": name, "dataset": entry.dataset, "arch": entry.arch,
            "recipe": entry.recipe, "norm": entry.paper.norm, "eps": entry.paper.eps,
            "metric": entry.paper.metric, "paper": entry.paper.value,
            "certbench": as_metric(entry.paper.metric, measured.get("certified_acc")),
            "clean": measured.get("clean_acc"),
            "epochs": found.get("recipe_args", entry.recipe_args).get("epochs"),
            "train_h": (round(found["train_time_s"] / 3600, 2) if "train_time_s" in found
                        else None),
            "hardware": found.get("zoo", {}).get("train_hardware"),
            "source": entry.paper.source,
        })
    return rows


def as_metric(metric: str, certified: float | None) -> float | None:
    """A certified accuracy in the paper's metric (verified error = 1 - accuracy)."""
    if certified is None:
        return None
    return 1.0 - certified if metric == "verified error" else certified
