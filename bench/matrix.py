"""The benchmark matrix: a TOML file -> a validated spec -> cells.

A matrix names one dataset, a seeded evaluation subset, norms, an epsilon grid, the models
(existing checkpoints, or recipes trained when their checkpoint is missing) and the
verifiers with their options. Every (model, verifier, norm) is one *cell*; every cell sees
the same points and the norm's epsilon grid (a model may have its own grids). Example
(the packaged ``quick`` matrix):

    name = "quick"
    dataset = "digits"
    samples = 200
    norms = ["2", "inf"]
    eps = { "2" = [0.1, 0.25, 0.5, 1.0], "inf" = [0.01, 0.02, 0.05, 0.1] }

    [[models]]
    name = "mlp-gloro"
    arch = "mlp"
    arch_args = { widths = [64, 64] }
    recipe = "gloro"
    recipe_args = { eps = 0.5, epochs = 40 }

    [[verifiers]]
    name = "global-lipschitz"
    options = { bound = "gloro" }

``[attack]`` sets the attack run on every cell (`AttackSpec`; on by default);
``[timing]`` how often each cell's certification is timed (`TimingSpec`).
``imports`` lists Python modules to import before the verifiers are looked up, so that a
user's own verifier registered with ``certbench.verifiers.register`` can be benchmarked.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from certbench.data import DATASETS
from certbench.errors import UserError
from certbench.models import ARCHITECTURES
from certbench.training.recipes import RECIPES
from certbench.verifiers import get_verifier, takes_option, verifier_names

PLUGIN_PATH = "CERTBENCH_PLUGIN_PATH"
"""Folders, besides Python's path, where a matrix's ``imports`` are looked up."""

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputNormalization(_Strict):
    """The normalisation a third-party network expects but does not contain: certbench
    puts (x - mean) / std in front of it, so epsilons stay in pixel space."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(not s > 0 for s in value):
            raise ValueError("every std must be positive")
        return value


def checked_grids(value: Any) -> Any:
    """Epsilon grids (one list, or a table norm -> list), sorted and deduplicated; raises
    ValueError on an empty grid or an epsilon that is not a positive number."""
    grids = value.values() if isinstance(value, dict) else [value]
    for grid in grids:
        if not grid:
            raise ValueError("an epsilon grid must not be empty")
        for eps in grid:
            if not math.isfinite(eps) or eps <= 0:
                raise ValueError(f"every epsilon must be a positive number, got {eps}")
    if isinstance(value, dict):
        return {str(k): sorted(set(v)) for k, v in value.items()}
    return sorted(set(value))


class ModelSpec(_Strict):
    """One of: ``checkpoint`` (a certbench checkpoint, or ``zoo:NAME``: a network of the
    zoo, `certbench.zoo`), ``arch`` (+ recipe, trained if
    missing) or ``onnx`` (a third-party network; a relative path is looked up as given,
    then under the data directory; ``normalization`` if the network expects normalised
    inputs). ``norms`` limits the model to some of the matrix's norms; ``eps``, a table
    ``{ "2" = [...] }``, replaces the matrix's grid of a norm for this model (a network
    trained for another radius); ``verifiers`` limits it to the matrix's verifiers of these
    names or labels (one too slow for a large network); ``attack``, a table of `AttackSpec`
    fields (``{ bisection_steps = 0 }``), replaces those fields of the matrix's attack for
    this model's cells (a network whose full attack would take most of the run)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    checkpoint: str | None = None
    onnx: str | None = None
    normalization: InputNormalization | None = None
    arch: str | None = None
    arch_args: dict[str, Any] = {}
    recipe: str = "standard"
    recipe_args: dict[str, Any] = {}
    seed: int = 0
    norms: list[Literal["2", "inf"]] | None = Field(default=None, min_length=1)
    eps: dict[str, list[float]] | None = None
    verifiers: list[str] | None = Field(default=None, min_length=1)
    attack: dict[str, Any] | None = None

    @field_validator("norms", mode="before")
    @classmethod
    def _norm_strings(cls, value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else value

    @field_validator("eps")
    @classmethod
    def _positive_eps(cls, value: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        return None if value is None else checked_grids(value)

    @field_validator("attack")
    @classmethod
    def _attack_fields(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                AttackSpec(**value)
            except ValidationError as exc:
                raise ValueError(first_error(exc)) from None
        return value

    def attack_for(self, matrix_attack: AttackSpec) -> AttackSpec:
        """The attack of this model's cells: the matrix's, with ``attack``'s fields."""
        if not self.attack:
            return matrix_attack
        return AttackSpec(**{**matrix_attack.model_dump(), **self.attack})

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str | None) -> str | None:
        if value is not None and value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; known: {', '.join(ARCHITECTURES)}")
        return value

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str) -> str:
        if value not in RECIPES:
            raise ValueError(f"unknown recipe {value!r}; known: {', '.join(RECIPES)}")
        return value


class VerifierSpec(_Strict):
    """A verifier by its registered name, with its options; ``label`` names it in tables;
    ``timeout_s`` limits each of its cells (wall clock), overriding the matrix's."""

    name: str
    options: dict[str, Any] = {}
    label: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)

    @property
    def display(self) -> str:
        """The label shown in tables: ``label``, else the name with its options."""
        if self.label:
            return self.label
        if not self.options:
            return self.name
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}[{opts}]"


class AttackSpec(_Strict):
    """The per-cell attack (bench/attacks.py): PGD with ``restarts`` random restarts of
    ``steps`` steps at every epsilon, ``bisection_steps`` for the smallest adversarial
    distance; ``targeted`` extra runs toward the classes with the next-highest logits;
    for smoothing cells, ``smoothing_noise_samples`` noisy copies per PGD step and PREDICT
    with ``smoothing_check_n`` samples at the attacked point."""

    enabled: bool = True
    steps: int = Field(default=50, gt=0)
    restarts: int = Field(default=3, gt=0)
    targeted: int = Field(default=2, ge=0)
    bisection_steps: int = Field(default=8, ge=0)
    smoothing_noise_samples: int = Field(default=16, gt=0)
    smoothing_check_n: int = Field(default=10_000, gt=0)


class TimingSpec(_Strict):
    """How many times a cell's certification pass is timed (cells.py).

    The first pass gives the results; then the whole pass (every point, same batches) is
    repeated while the repeats fit in ``budget_s`` seconds: 1 + floor(budget_s / t_1)
    passes in all, t_1 the first pass's time, clamped to [``min_repeats``,
    ``max_repeats``]. Cheap cells are timed many times, expensive ones once or twice, so
    the default (1 s, at most 10 passes) adds about 10 % to the default matrix.

    ``rounds`` > 1 times every cell again in ``rounds - 1`` later *timing rounds*: after
    all cells have run, each round gives every cell a fresh worker (setup, warm-up and
    passes by the same rule, certificates discarded), round after round, so each cell's
    passes are spread over the whole run. Why: on a shared or virtual machine the speed
    drifts over seconds (measured on a 2-core VM: medians of 1 s blocks of one cell's
    passes, in one process, 0.65x-1.22x of their median, in streaks of about ten seconds),
    so passes taken back to back measure the machine's speed at that moment, not the code.
    Timing is not part of a cell's key: changing it reruns nothing, and raising
    ``rounds`` on a finished results folder adds the missing rounds."""

    max_repeats: int = Field(default=10, ge=1)
    min_repeats: int = Field(default=1, ge=1)
    budget_s: float = Field(default=1.0, ge=0)
    rounds: int = Field(default=1, ge=1, le=50)

    @model_validator(mode="after")
    def _ordered(self) -> TimingSpec:
        if self.min_repeats > self.max_repeats:
            raise ValueError(f"min_repeats ({self.min_repeats}) exceeds max_repeats "
                             f"({self.max_repeats})")
        return self

    def passes(self, first_s: float) -> int:
        """Timed passes in all for a cell whose first pass took ``first_s`` seconds."""
        fit = 1 + int(self.budget_s // first_s) if first_s > 0 else self.max_repeats
        return max(self.min_repeats, min(self.max_repeats, fit))


class CellSettings(_Strict):
    """What every cell of a run shares besides its model and verifier: the norms and
    their epsilon grids, the seed (evaluation points, attacks), the batch size, the attack
    and the timing. A matrix has these at its top level; the Python API takes them as
    arguments."""

    seed: int = 0
    norms: list[Literal["2", "inf"]] = ["2"]
    eps: list[float] | dict[str, list[float]]
    batch_size: int = Field(default=256, gt=0)
    attack: AttackSpec = AttackSpec()
    timing: TimingSpec = TimingSpec()

    @field_validator("norms", mode="before")
    @classmethod
    def _norm_strings(cls, value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else value

    @field_validator("eps")
    @classmethod
    def _positive_eps(
        cls, value: list[float] | dict[str, list[float]]
    ) -> list[float] | dict[str, list[float]]:
        return checked_grids(value)

    def eps_for(self, norm: str) -> list[float]:
        """The epsilon grid of ``norm``: ``eps`` is one grid for all norms, or a table
        ``{ "2" = [...], "inf" = [...] }`` with one grid per norm."""
        return self.eps[norm] if isinstance(self.eps, dict) else self.eps

    def grid_problem(self) -> str | None:
        """Why the epsilon table does not fit the norms, or None."""
        if isinstance(self.eps, dict) and set(self.eps) != set(self.norms):
            return (f"eps: the table must have one grid per norm {self.norms}, "
                    f"got {sorted(self.eps)}")
        return None


class MatrixSpec(CellSettings):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    dataset: str
    samples: int = Field(default=200, gt=0)
    device: str = "auto"
    timeout_s: float | None = Field(default=None, gt=0)
    download: bool = False
    imports: list[str] = []
    models: list[ModelSpec] = Field(min_length=1)
    verifiers: list[VerifierSpec] = Field(min_length=1)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; known: {', '.join(DATASETS)}")
        return value

    def with_seed(self, seed: int) -> MatrixSpec:
        """This matrix with every seed set to ``seed``, for seed studies (`certbench run
        --seed`): the evaluation points' and the attacks' (``seed``), each recipe model's
        (trained anew: the seed is part of its checkpoint's name), and each verifier's
        whose constructor takes a ``seed`` and whose options do not set one (smoothing's
        noise, local-lipschitz's sampling). A verifier keeps the label it had, so that the
        tables of different seeds line up."""
        models = [m.model_copy(update={"seed": seed}) if m.arch is not None else m
                  for m in self.models]
        verifiers = [
            v.model_copy(update={"options": {**v.options, "seed": seed}, "label": v.display})
            if takes_option(v.name, "seed") and "seed" not in v.options else v
            for v in self.verifiers
        ]
        return self.model_copy(update={"seed": seed, "models": models, "verifiers": verifiers})


def first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "matrix"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}"


def parse_matrix(data: dict[str, Any], source: str = "matrix",
                 folder: Path | None = None) -> MatrixSpec:
    """Validate a matrix given as a dict; UserError naming the first problem. ``folder``:
    where the matrix file is (its ``imports`` may sit next to it)."""
    try:
        spec = MatrixSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{source}: {first_error(exc)}") from exc
    if spec.imports:
        add_plugin_folders([folder or Path.cwd(), Path.cwd()])
    for module in spec.imports:
        try:
            import_plugins((module,))
        except ImportError as exc:
            raise UserError(
                f"{source}: imports: cannot import {module!r} ({exc}); modules are looked "
                f"up on Python's path, next to the matrix file and in the working folder; "
                "for one elsewhere, add its folder to PYTHONPATH") from exc
    if spec.grid_problem():
        raise UserError(f"{source}: {spec.grid_problem()}")
    check_verifiers(spec.verifiers, f"{source}: verifiers")
    names = [m.name for m in spec.models]
    if len(set(names)) != len(names):
        raise UserError(f"{source}: models: two models share a name; names must be unique")
    for i, model in enumerate(spec.models):
        given = [k for k in ("checkpoint", "arch", "onnx") if getattr(model, k) is not None]
        if len(given) != 1:
            raise UserError(f"{source}: models.{i}: give exactly one of `checkpoint`, `arch` "
                            f"or `onnx` (got {', '.join(given) or 'none'})")
        if model.norms is not None and not set(model.norms) <= set(spec.norms):
            raise UserError(f"{source}: models.{i}: norms {model.norms} must be among the "
                            f"matrix's norms {spec.norms}")
        if model.eps is not None and not set(model.eps) <= set(model.norms or spec.norms):
            raise UserError(f"{source}: models.{i}: eps is a table of the model's norms "
                            f"({model.norms or spec.norms}), got {sorted(model.eps)}")
        known = {name for v in spec.verifiers for name in (v.name, v.display)}
        if model.verifiers is not None and not set(model.verifiers) <= known:
            unknown = sorted(set(model.verifiers) - known)
            raise UserError(f"{source}: models.{i}: verifiers {unknown} are not among the "
                            f"matrix's verifiers (names or labels: {sorted(known)})")
        if model.normalization is not None and model.onnx is None:
            raise UserError(f"{source}: models.{i}: `normalization` is for `onnx` models "
                            "(certbench models carry their own)")
    return spec


def add_plugin_folders(folders: list[Path]) -> None:
    """Let `import_plugins` look in ``folders`` too, here and in every worker started
    from now on (through ``$CERTBENCH_PLUGIN_PATH``, which workers inherit)."""
    known = [p for p in os.environ.get(PLUGIN_PATH, "").split(os.pathsep) if p]
    added = [str(f) for f in folders if str(f) not in known]
    os.environ[PLUGIN_PATH] = os.pathsep.join(known + added)


def import_plugins(modules: tuple[str, ...]) -> None:
    """Import a matrix's ``imports`` (user verifiers register themselves on import), from
    Python's path or the folders of ``$CERTBENCH_PLUGIN_PATH``; a worker process does this
    before it looks a verifier up."""
    for folder in os.environ.get(PLUGIN_PATH, "").split(os.pathsep):
        if folder and folder not in sys.path:
            sys.path.append(folder)
    for module in modules:
        importlib.import_module(module)


def packaged_matrices() -> list[str]:
    """Names of the matrices shipped with certbench (``--matrix NAME``)."""
    folder = resources.files("certbench") / "matrices"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_matrix(path_or_name: str | Path) -> MatrixSpec:
    """Read a matrix file, or a packaged matrix by name (``quick``, ...)."""
    path = Path(path_or_name)
    if not path.exists() and str(path_or_name) in packaged_matrices():
        text = (resources.files("certbench") / "matrices" / f"{path_or_name}.toml").read_text()
    elif not path.exists():
        raise UserError(
            f"matrix file {path} not found; give a TOML file or one of: "
            f"{', '.join(packaged_matrices())}"
        )
    else:
        text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from exc
    return parse_matrix(data, str(path), path.resolve().parent if path.exists() else None)

def check_verifiers(verifiers: list[VerifierSpec], where: str) -> None:
    """UserError naming the first verifier whose name is not registered, whose options
    its constructor refuses (constructors only store their options: this is cheap), whose
    table label another entry already has, or whose ``label`` is another verifier's name
    (a model's ``verifiers`` list, which matches names and labels, would pick both)."""
    known = verifier_names()
    labels: set[str] = set()
    for i, verifier in enumerate(verifiers):
        if verifier.name not in known:
            raise UserError(f"{where}.{i}.name: unknown verifier {verifier.name!r}; known: "
                            f"{', '.join(known)} (see `certbench list`)")
        if verifier.label in set(known) - {verifier.name}:
            raise UserError(f"{where}.{i}.label: {verifier.label!r} is another verifier's "
                            "name; choose a label that is not")
        if verifier.display in labels:
            raise UserError(f"{where}.{i}: another verifier is already shown as "
                            f"{verifier.display!r} in tables; remove the repeat or, in a "
                            "matrix, give one of them a `label`")
        labels.add(verifier.display)
        try:
            get_verifier(verifier.name, **verifier.options)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}.{i}.options: {exc}") from exc
