"""A cell as a value, and the pure function that runs it.

A `Cell` holds everything its rows depend on: the network (a module on the CPU), its
card and checkpoint hash, the evaluation points, the verifier with its options, the norm,
the epsilon grid, the device, the batch size, the attack settings and, once the model's
attack has run, its outcome for the soundness cross-check. `Cell.run()` loads nothing
from disk and writes nothing: it returns the cell's rows for the three tables, so an
executor (executors.py) can run it in a worker process or on another machine and the
driver stays the only writer of the store. `AttackJob` is the same for the PGD attack
that every cell of a (model, norm) shares.

Per cell: *setup* is ``Verifier.prepare`` (timed once); a warm-up certification of two
samples follows and is excluded; then the samples are certified in batches of
``batch_size`` (the first pass, whose certificate gives the rows), and the whole pass is
timed again as many times as the matrix's ``[timing]`` allows (`TimingSpec.passes`: cheap
cells often, expensive ones once or twice). ``certify_s`` is the median wall time of the
passes, ``per_sample_s`` that over the number of samples, ``certify_cpu_s`` the median CPU
time; ``certify_runs_s`` and ``certify_cpu_runs_s`` keep every pass (what `certbench
compare` bootstraps), ``certify_passes`` their number and ``certify_iqr_s`` their
interquartile range. With ``[timing] rounds`` > 1 the driver times the cell again later in
fresh workers (`TimingRound`, runner.py); ``certify_run_rounds`` names each pass's round,
``certify_rounds`` counts them, and ``certify_s`` becomes the median of the rounds' median
passes. ``time_s`` per sample is its batch's time in the first pass divided
by the batch size, unless the verifier reports its own ``time_s`` column. Peak memory
covers setup, warm-up and certification (measure.py); the baseline is taken after the
model and the points are on the device, so in a fresh worker process it is what the cell
itself used.

Attacks and the soundness cross-check (``[attack]`` in the matrix, on by default): PGD
attacks every sample's *prediction* at every epsilon of the grid and bisects for the
smallest adversarial distance (`attacks.attack_grid`, time ``attack_s``). Every cell then
gets ``attack_upper_bound`` per epsilon (the fraction of samples correctly classified and
not flipped: an upper bound on robust accuracy, hence on certified accuracy) and per
sample ``attack_success``, ``adv_distance`` and ``violation``. A *soundness violation* is a
sample certified at an epsilon where the attack flipped it, or whose certified radius
exceeds the distance of an adversarial point found; the cell counts them in
``soundness_violations`` and `certbench run` exits with code 1.

Probabilistic cells (randomized smoothing) are checked apart: the base network's attack
says nothing about the smoothed classifier, so their ``attack_upper_bound`` is NaN; each
certified sample is attacked at its largest certified epsilon with PGD on the smoothed
classifier (`attacks.smoothed_pgd`) and the point is classified by the verifier's
PREDICT (the `SmoothedClassifier` protocol). A decided class other than the certified one
counts in ``probabilistic_violations`` (each certificate may fail with probability alpha,
so a few are possible without a bug; they are reported, not fatal).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from certbench.matrix import AttackSpec, CellSettings, TimingSpec, VerifierSpec, import_plugins
from certbench.provenance import canonical_json
from certbench.run.attacks import AttackOutcome, attack_grid, smoothed_pgd
from certbench.run.measure import PeakMemory, timed, timed_cpu
from certbench.verifiers import (
    ABSTAIN,
    VERDICTS,
    Certificate,
    Diagnosed,
    SmoothedClassifier,
    Verdict,
    get_verifier,
)

WARMUP_SAMPLES = 2
SMOOTHED_ATTACK_BATCH = 64  # samples per PGD batch on the smoothed classifier (x noise copies)


@dataclass(frozen=True)
class Subject:
    """A model under test: its name in tables, the module (on the CPU), its card
    (``arch``, ``recipe``, and ``normalization`` for an ONNX network's input transform),
    the sha256 of its checkpoint, ONNX file or weights, the norms it is evaluated at
    (None: every norm of the run), its own epsilon grids by norm (where absent, the
    run's), the verifiers it runs under, by name or label (None: all of the run's), and
    its own attack (None: the run's)."""

    name: str
    model: nn.Module
    card: dict[str, Any]
    sha256: str
    norms: tuple[str, ...] | None = None
    eps: dict[str, tuple[float, ...]] | None = None
    verifiers: tuple[str, ...] | None = None
    attack: AttackSpec | None = None

    def runs_under(self, verifier: VerifierSpec) -> bool:
        """Whether the subject runs under ``verifier`` (named by its name or label)."""
        return self.verifiers is None or bool({verifier.name, verifier.display}
                                              & set(self.verifiers))


@dataclass(frozen=True)
class Points:
    """The evaluation points every cell of a run shares (inputs in [0, 1], labels, their
    indices in the dataset) and what names them in cell keys: the dataset, sample count and
    seed of a matrix, or a hash of the points given to the Python API."""

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    identity: dict[str, Any]


def build_cells(
    subjects: list[Subject], verifiers: list[VerifierSpec], settings: CellSettings,
    points: Points, *, dataset: str, device: str, timeout_s: float | None = None,
    imports: tuple[str, ...] = (),
) -> list[Cell]:
    """Every (subject, verifier, norm) of a run as a `Cell`, in that order, at a subject's
    own ``norms``, epsilon grids, ``verifiers`` and attack where it has them: the one way
    cells are made (`certbench run` and `certbench.evaluate`). A cell's key hashes the
    checkpoint's sha256, the verifier and its options, the norm and its epsilon grid, the
    device, the attack settings and the points' identity; timing is not part of it.
    ``timeout_s`` applies where a verifier sets none."""
    cells = []
    for subject in subjects:
        attack = subject.attack or settings.attack
        for verifier in filter(subject.runs_under, verifiers):
            for norm in settings.norms:
                if subject.norms is not None and norm not in subject.norms:
                    continue
                eps = list((subject.eps or {}).get(norm) or settings.eps_for(norm))
                identity = {
                    "checkpoint_sha256": subject.sha256, "verifier": verifier.name,
                    "options": verifier.options, "norm": norm, "eps": eps, **points.identity,
                    "device": torch.device(device).type,
                    "attack": attack.model_dump(),
                }
                if subject.card.get("normalization"):
                    identity["normalization"] = subject.card["normalization"]
                cells.append(Cell(
                    key=hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16],
                    label=f"{subject.name} / {verifier.display} / l{norm}",
                    model=subject.model, x=points.x, y=points.y, indices=points.indices,
                    verifier=verifier, norm=norm, eps=tuple(eps), device=device,
                    batch_size=settings.batch_size, attack=attack,
                    seed=settings.seed, identity=_row_identity(subject, dataset, verifier,
                                                               norm, device),
                    timeout_s=verifier.timeout_s or timeout_s, imports=imports,
                    timing=settings.timing))
    return cells


def _row_identity(subject: Subject, dataset: str, verifier: VerifierSpec, norm: str,
                  device: str) -> dict[str, Any]:
    """The columns that name a cell in its row (model, dataset, arch, recipe, checkpoint,
    verifier label, method, options, norm, device)."""
    return {
        "model": subject.name, "dataset": dataset, "arch": subject.card.get("arch"),
        "recipe": subject.card.get("recipe"), "checkpoint_sha256": subject.sha256,
        "verifier": verifier.display, "method": verifier.name,
        "options": canonical_json(verifier.options), "norm": norm, "device": device,
    }


@dataclass(frozen=True, eq=False)
class AttackJob:
    """PGD on every point at every epsilon of one norm's grid (`attacks.attack_grid`)."""

    label: str
    model: nn.Module
    x: torch.Tensor
    eps: tuple[float, ...]
    norm: str
    attack: AttackSpec
    seed: int
    batch_size: int
    device: str
    timeout_s: float | None = None
    imports: tuple[str, ...] = ()

    def run(self) -> AttackOutcome:
        device = torch.device(self.device)
        a = self.attack
        outcome = attack_grid(self.model.to(device).eval(), self.x.to(device), list(self.eps),
                              self.norm, a.steps, a.restarts, a.bisection_steps,
                              seed=self.seed, batch_size=self.batch_size, targeted=a.targeted)
        return AttackOutcome(outcome.success.cpu(), outcome.distance.cpu(), outcome.seconds)


@dataclass(frozen=True, eq=False, kw_only=True)
class Cell:
    """One (model, verifier with options, norm, eps grid, sample set, device): docs/architecture.md.

    ``identity`` holds the row fields that name the cell (model, dataset, arch, recipe,
    checkpoint_sha256, verifier, method, options, norm, device, attack); ``cross_check``
    is the model's attack outcome on these points in this norm, when attacks are on."""

    key: str
    label: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    verifier: VerifierSpec
    norm: str
    eps: tuple[float, ...]
    device: str
    batch_size: int
    attack: AttackSpec
    seed: int = 0
    identity: dict[str, Any] = field(default_factory=dict)
    cross_check: AttackOutcome | None = None
    timeout_s: float | None = None
    imports: tuple[str, ...] = ()
    timing: TimingSpec = field(default_factory=TimingSpec)

    def base_row(self) -> dict[str, Any]:
        """The cell's row before anything ran (what a failed worker leaves)."""
        return {
            "cell_key": self.key, **self.identity, "n_samples": len(self.y),
            "clean_acc": float("nan"), "status": "ok", "error": None,
            "setup_s": float("nan"), "certify_s": float("nan"), "per_sample_s": float("nan"),
            "certify_cpu_s": float("nan"), "certify_iqr_s": float("nan"),
            "certify_passes": 0, "certify_rounds": 0, "certify_runs_s": None,
            "certify_cpu_runs_s": None, "certify_run_rounds": None,
            "timing": canonical_json(self.timing.model_dump()),
            "peak_mem_bytes": None, "mem_kind": None, "probabilistic": False, "alpha": None,
            "eps_grid": json.dumps(list(self.eps)), "soundness_violations": None,
            "probabilistic_violations": None,
            "attack": canonical_json(self.attack.model_dump()) if self.attack.enabled else None,
            "attack_s": None if self.cross_check is None else self.cross_check.seconds,
            "started_at": pd.Timestamp.now(tz="UTC"),
        }

    def failed(self, status: str, reason: str, started_at: pd.Timestamp) -> dict[str, pd.DataFrame]:
        """The rows of a cell whose worker did not return (timeout, crash, memory limit)."""
        row = self.base_row()
        row.update(status=status, error=reason[:500], started_at=started_at,
                   finished_at=pd.Timestamp.now(tz="UTC"))
        return {"cells": pd.DataFrame([row])}

    def run(self) -> dict[str, pd.DataFrame]:
        """Certify, measure and cross-check; the rows of the three tables. A failure of the
        verifier is recorded in the cell row (status, error), never raised."""
        import_plugins(self.imports)
        device = torch.device(self.device)
        model = self.model.to(device).eval()
        x, y = self.x.to(device), self.y.cpu()
        eps = list(self.eps)
        with torch.no_grad():
            clean_pred = model(x).argmax(1).cpu()
        row = self.base_row()
        row["clean_acc"] = float((clean_pred == y).float().mean())
        tables: dict[str, pd.DataFrame] = {}
        memory = PeakMemory(device)
        try:
            verifier = get_verifier(self.verifier.name, **self.verifier.options)
            with memory:
                cert, per_sample, walls, cpus, row["setup_s"] = self.certify_timed(
                    verifier, model, x)
            row.update(timing_columns(walls, cpus, [0] * len(walls), len(y)),
                       probabilistic=cert.probabilistic, alpha=cert.alpha)
            if isinstance(verifier, Diagnosed):
                try:  # a failed diagnostic leaves the certificate whole
                    columns, row["diagnostics_s"] = timed(lambda: _diagnose(
                        verifier, x, self.norm, eps, self.batch_size), device)
                    clash = set(columns) & set(cert.columns)
                    if clash:
                        raise ValueError(f"diagnostics repeat the certificate's {sorted(clash)}")
                    cert.columns.update(columns)
                except Exception as exc:
                    row["diagnostics_error"] = f"{type(exc).__name__}: {exc}"[:500]
            tables = _certificate_tables(self.key, cert, per_sample, y, self.indices, eps)
            if self.cross_check is not None and not cert.probabilistic:
                row["soundness_violations"] = _cross_check(tables, cert, self.cross_check,
                                                           clean_pred, y, eps)
            elif cert.probabilistic and self.attack.enabled:
                if not isinstance(verifier, SmoothedClassifier):
                    raise TypeError(f"{self.verifier.name} returns probabilistic certificates "
                                    "but does not implement the SmoothedClassifier protocol")
                row["probabilistic_violations"] = _check_smoothing(
                    tables["samples"], verifier, model, x, cert, eps, self.norm, self.attack)
        except torch.cuda.OutOfMemoryError as exc:
            row.update(status="oom", error=str(exc).splitlines()[0][:500])
        except MemoryError as exc:
            row.update(status="oom", error=f"MemoryError: {exc}"[:500])
        except Exception as exc:  # a verifier failure must not stop the run
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        row.update(peak_mem_bytes=memory.peak_bytes, mem_kind=memory.kind,
                   finished_at=pd.Timestamp.now(tz="UTC"))
        tables["cells"] = pd.DataFrame([row])
        return tables


    def certify_timed(self, verifier: Any, model: nn.Module, x: torch.Tensor):
        """Prepare the verifier (timed: the setup seconds), warm it up, certify every
        batch, then repeat the pass as the timing rule allows. Returns the certificate,
        the per-sample seconds, the wall and CPU seconds of every timed pass, and the
        setup seconds."""
        device = torch.device(self.device)
        _, setup_s = timed(lambda: verifier.prepare(model, tuple(x.shape[1:])), device)
        verifier.certify(x[:WARMUP_SAMPLES], self.norm, list(self.eps))
        cert, per_sample, wall, cpu = _certify_batches(verifier, x, self.norm,
                                                       list(self.eps), self.batch_size, device)
        walls, cpus = self._repeat_passes(verifier, x, wall, cpu)
        return cert, per_sample, walls, cpus, setup_s

    def _repeat_passes(self, verifier: Any, x: torch.Tensor, wall: float,
                       cpu: float) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of every timed pass: the first (given) and the repeats
        the timing rule allows after it."""
        walls, cpus = [wall], [cpu]
        for _ in range(self.timing.passes(wall) - 1):
            *_, wall, cpu = _certify_batches(verifier, x, self.norm, list(self.eps),
                                             self.batch_size, torch.device(self.device))
            walls.append(wall)
            cpus.append(cpu)
        return walls, cpus


@dataclass(frozen=True, eq=False)
class TimingRound:
    """A later timing round of a cell (`TimingSpec.rounds`): in a fresh worker, the
    verifier is prepared, warmed up and its passes timed as in `Cell.run`; the
    certificates are discarded. ``run`` returns the passes' wall and CPU seconds."""

    cell: Cell
    round: int

    @property
    def label(self) -> str:
        return f"{self.cell.label} (timing round {self.round + 1})"

    @property
    def device(self) -> str:
        return self.cell.device

    @property
    def timeout_s(self) -> float | None:
        return self.cell.timeout_s

    def run(self) -> tuple[list[float], list[float]]:
        cell = self.cell
        import_plugins(cell.imports)
        device = torch.device(cell.device)
        model = cell.model.to(device).eval()
        x = cell.x.to(device)
        verifier = get_verifier(cell.verifier.name, **cell.verifier.options)
        _, _, walls, cpus, _ = cell.certify_timed(verifier, model, x)
        return walls, cpus


def timing_columns(walls: list[float], cpus: list[float], rounds: list[int],
                   n: int) -> dict[str, Any]:
    """The cell row's timing columns from every timed pass (wall and CPU seconds, and the
    timing round each pass belongs to). ``certify_s`` is the median over rounds of each
    round's median pass (with one round: the median pass)."""
    walls_a, cpus_a, rounds_a = np.asarray(walls), np.asarray(cpus), np.asarray(rounds)
    labels = np.unique(rounds_a)
    median = float(np.median([np.median(walls_a[rounds_a == r]) for r in labels]))
    cpu = float(np.median([np.median(cpus_a[rounds_a == r]) for r in labels]))
    q1, q3 = np.percentile(walls, [25, 75])
    return {"certify_s": median, "per_sample_s": median / n,
            "certify_cpu_s": cpu, "certify_iqr_s": float(q3 - q1),
            "certify_passes": len(walls), "certify_rounds": len(labels),
            "certify_runs_s": [float(w) for w in walls],
            "certify_cpu_runs_s": [float(c) for c in cpus],
            "certify_run_rounds": [int(r) for r in rounds]}


def add_timing_round(row: dict[str, Any], round_: int, walls: list[float],
                     cpus: list[float]) -> dict[str, Any]:
    """``row`` (a cell row) with one more timing round's passes merged in (a row from
    before repetitions counts its single time as round 0's one pass)."""
    def listed(column: str, single: str) -> list:
        value = row.get(column)
        if value is None or (np.isscalar(value) and pd.isna(value)):
            return [row.get(single, float("nan"))] if single else []
        return list(value)

    earlier = listed("certify_runs_s", "certify_s")
    rounds = listed("certify_run_rounds", "") or [0] * len(earlier)
    merged = timing_columns(earlier + list(walls),
                            listed("certify_cpu_runs_s", "certify_cpu_s") + list(cpus),
                            rounds + [round_] * len(walls), int(row["n_samples"]))
    return {**row, **merged}


def _certify_batches(
    verifier: Any, x: torch.Tensor, norm: str, eps: list[float], batch_size: int,
    device: torch.device,
) -> tuple[Certificate, list[float], float, float]:
    """Certify ``x`` in batches: the merged certificate, per-sample seconds, and the total
    wall-clock and CPU seconds."""
    parts, per_sample, total, cpu = [], [], 0.0, 0.0
    starts = range(0, len(x), batch_size)
    for start in starts:
        batch = x[start : start + batch_size]
        cert, seconds, cpu_seconds = timed_cpu(
            lambda b=batch: verifier.certify(b, norm, eps), device)
        parts.append(cert)
        per_sample += [seconds / len(batch)] * len(batch)
        total += seconds
        cpu += cpu_seconds
    first = parts[0]
    columns = {k: torch.cat([p.columns[k] for p in parts]) for k in first.columns}
    merged = Certificate(
        prediction=torch.cat([p.prediction for p in parts]),
        verdicts=torch.cat([p.verdicts for p in parts]),
        radius=None if first.radius is None else torch.cat([p.radius for p in parts]),
        columns=columns,
        probabilistic=first.probabilistic,
        alpha=first.alpha,
        counterexamples={(start + n, k): point for start, p in zip(starts, parts, strict=True)
                         for (n, k), point in p.counterexamples.items()},
    )
    return merged, per_sample, total, cpu


def _diagnose(verifier: Diagnosed, x: torch.Tensor, norm: str, eps: list[float],
              batch_size: int) -> dict[str, torch.Tensor]:
    """The verifier's diagnostic columns for ``x``, in the certification's batches."""
    parts = [verifier.diagnostics(x[start : start + batch_size], norm, eps)
             for start in range(0, len(x), batch_size)]
    return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}


def _certificate_tables(
    key: str, cert: Certificate, per_sample: list[float], y: torch.Tensor,
    indices: torch.Tensor, eps: list[float],
) -> dict[str, pd.DataFrame]:
    n, k = len(y), len(eps)
    names = np.array([v.value for v in VERDICTS])
    verdict = names[cert.verdicts.long().reshape(-1).numpy()]  # sample-major
    samples = pd.DataFrame({
        "cell_key": key,
        "sample_index": indices.repeat_interleave(k).numpy(),
        "label": y.repeat_interleave(k).numpy(),
        "prediction": cert.prediction.repeat_interleave(k).numpy(),
        "eps": eps * n,
        "verdict": verdict,
        "radius": (
            cert.radius.double().repeat_interleave(k).numpy() if cert.radius is not None
            else float("nan")
        ),
        "time_s": torch.tensor(per_sample).repeat_interleave(k).numpy(),
    })
    for name, values in cert.columns.items():
        values = values.double()
        samples[name] = (values.reshape(-1) if values.dim() == 2 else
                         values.repeat_interleave(k)).numpy()
    samples["certified"] = (samples["verdict"] == Verdict.CERTIFIED.value) & (
        samples["prediction"] == samples["label"]
    )
    certified = (
        samples.groupby("eps", sort=True)["certified"].mean().rename("certified_acc").reset_index()
    )
    certified.insert(0, "cell_key", key)
    certified["attack_upper_bound"] = float("nan")
    return {"samples": samples, "certified": certified}


def _cross_check(
    tables: dict[str, pd.DataFrame], cert: Certificate, attack: AttackOutcome,
    clean_pred: torch.Tensor, y: torch.Tensor, eps: list[float],
) -> int:
    """Add the attack's columns and upper bound; return the number of samples with a
    soundness violation."""
    k = len(eps)
    samples = tables["samples"]
    samples["attack_success"] = attack.success.reshape(-1).numpy()
    samples["adv_distance"] = attack.distance.repeat_interleave(k).numpy()
    certified_at = cert.verdicts == VERDICTS.index(Verdict.CERTIFIED)
    flipped = (certified_at & attack.success).any(dim=1)
    if cert.radius is not None:
        flipped |= cert.radius.double() > attack.distance
    samples["violation"] = flipped.repeat_interleave(k).numpy()
    robust = (clean_pred == y)[:, None] & ~attack.success
    upper = dict(zip(eps, robust.double().mean(dim=0).tolist(), strict=True))
    tables["certified"]["attack_upper_bound"] = tables["certified"]["eps"].map(upper)
    return int(flipped.sum())


def _check_smoothing(
    samples: pd.DataFrame, verifier: SmoothedClassifier, model: nn.Module, x: torch.Tensor,
    cert: Certificate, eps: list[float], norm: str, attack: AttackSpec,
) -> int:
    """Attack each certified sample of a smoothing cell at its largest certified epsilon;
    return how many points PREDICT assigns a class other than the certified one."""
    certified_at = cert.verdicts == VERDICTS.index(Verdict.CERTIFIED)
    grid = torch.tensor(eps, dtype=torch.float64)
    largest = torch.where(certified_at, grid, torch.zeros_like(grid)).max(dim=1).values
    checked = (largest > 0).nonzero().flatten()
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for chunk in checked.split(SMOOTHED_ATTACK_BATCH):
        idx = chunk.to(x.device)
        target = cert.prediction[chunk].to(x.device)
        points = smoothed_pgd(model, x[idx], target, largest[chunk].to(x.device), norm,
                              verifier.sigma, attack.smoothing_noise_samples, attack.steps)
        decided = verifier.predict(points, n=attack.smoothing_check_n)
        flipped[chunk] = (decided != ABSTAIN) & (decided != cert.prediction[chunk])
    samples["smoothed_attack_flipped"] = flipped.repeat_interleave(len(eps)).numpy()
    return int(flipped.sum())
