"""Runs a matrix: models are loaded (or trained), then each cell is certified, measured and
stored.

A cell is (model, verifier with its options, norm, epsilon grid, sample set, device); its
key hashes all of that plus the checkpoint's sha256 (DESIGN.md). A cell whose key is in
the store with status ``ok`` is skipped unless ``force``; a failing cell is stored with
its status (``error``, ``oom``) and reason, and the run goes on.

Per cell: *setup* is ``Verifier.prepare`` (timed once); a warm-up certification of two
samples follows and is excluded; then the samples are certified in batches of
``batch_size``, and ``per_sample_s`` is the certification time over the number of samples
(``time_s`` per sample is its batch's time divided by the batch size, unless the
verifier reports its own ``time_s`` column). Peak memory covers setup, warm-up and
certification (measure.py).

Attacks and the soundness cross-check (``[attack]`` in the matrix, on by default): once per
model and norm, PGD attacks every sample's *prediction* at every epsilon of the grid and
bisects for the smallest adversarial distance (`attacks.attack_grid`, time ``attack_s``).
Every cell then gets ``attack_upper_bound`` per epsilon (the fraction of samples correctly
classified and not flipped: an upper bound on robust accuracy, hence on certified
accuracy) and per sample ``attack_success``, ``adv_distance`` and ``violation``. A
*soundness violation* is a sample certified at an epsilon where the attack flipped it, or
whose certified radius exceeds the distance of an adversarial point found; the cell
counts them in ``soundness_violations`` and `certbench run` exits with code 1.

Probabilistic cells (randomized smoothing) are checked apart: the base network's attack
says nothing about the smoothed classifier, so their ``attack_upper_bound`` is NaN; each
certified sample is attacked at its largest certified epsilon with PGD on the smoothed
classifier (`attacks.smoothed_pgd`) and the point is classified with the verifier's
PREDICT. A decided class other than the certified one counts in
``probabilistic_violations`` (each certificate may fail with probability alpha, so a few
are possible without a bug; they are reported, not fatal).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from certbench.attacks import AttackOutcome, attack_grid, smoothed_pgd
from certbench.data import Dataset, default_data_dir, eval_indices, load_dataset
from certbench.errors import UserError
from certbench.matrix import AttackSpec, MatrixSpec, ModelSpec, VerifierSpec, canonical_json
from certbench.measure import PeakMemory, timed
from certbench.models import checkpoint_paths, file_sha256, load_checkpoint
from certbench.onnx_import import as_classifier, load_onnx, read_onnx_bytes
from certbench.provenance import git_commit, library_versions
from certbench.store import ResultsStore
from certbench.train import recipe_args, train_model
from certbench.verifiers import ABSTAIN, VERDICTS, Certificate, Verdict, get_verifier

WARMUP_SAMPLES = 2
SMOOTHED_ATTACK_BATCH = 64  # samples per PGD batch on the smoothed classifier (x noise copies)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available; use cpu or auto")
    return device


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


def ensure_model(
    spec: ModelSpec, dataset: Dataset, checkpoint_dir: Path, device: torch.device, progress: bool,
    data_dir: str | Path | None = None,
) -> LoadedModel:
    """Load the model's checkpoint, training it first if it is a recipe without one; or
    convert its ONNX file."""
    if spec.onnx is not None:
        return load_onnx_model(spec, dataset, data_dir, device)
    stem = model_stem(spec, dataset.name, checkpoint_dir)
    weights, _ = checkpoint_paths(stem)
    if spec.checkpoint is None and not weights.exists():
        train_model(
            stem, dataset, spec.arch, spec.arch_args, spec.recipe, spec.recipe_args,
            seed=spec.seed, device=str(device), progress=progress,
        )
    model, card = load_checkpoint(stem)
    if card.get("dataset") != dataset.name:
        raise UserError(
            f"model {spec.name!r}: checkpoint {weights} was trained on {card.get('dataset')!r}, "
            f"but the matrix dataset is {dataset.name!r}"
        )
    return LoadedModel(spec, model.to(device).eval(), card, file_sha256(weights))


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


def _certify_batches(
    verifier: Any, x: torch.Tensor, norm: str, eps: list[float], batch_size: int,
    device: torch.device,
) -> tuple[Certificate, list[float], float]:
    """Certify ``x`` in batches: the merged certificate, per-sample seconds, total seconds."""
    parts, per_sample, total = [], [], 0.0
    starts = range(0, len(x), batch_size)
    for start in starts:
        batch = x[start : start + batch_size]
        cert, seconds = timed(lambda b=batch: verifier.certify(b, norm, eps), device)
        parts.append(cert)
        per_sample += [seconds / len(batch)] * len(batch)
        total += seconds
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
    return merged, per_sample, total


def run_cell(
    spec: MatrixSpec, loaded: LoadedModel, verifier_spec: VerifierSpec, norm: str,
    x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, device: torch.device, key: str,
    context: dict[str, Any], attack: AttackOutcome | None = None,
) -> dict[str, pd.DataFrame]:
    """Run one cell and return its rows for the three tables (never raises for a
    failure of the verifier: the cell row records it). ``attack`` is the model's attack
    on these samples and this norm, for the soundness cross-check."""
    eps = spec.eps_for(norm)
    with torch.no_grad():
        clean_pred = loaded.model(x).argmax(1).cpu()
    row: dict[str, Any] = {
        "cell_key": key, "model": loaded.spec.name, "dataset": spec.dataset,
        "arch": loaded.card.get("arch"), "recipe": loaded.card.get("recipe"),
        "checkpoint_sha256": loaded.sha256, "verifier": verifier_spec.display,
        "method": verifier_spec.name, "options": canonical_json(verifier_spec.options),
        "norm": norm, "device": str(device), "n_samples": len(y),
        "clean_acc": float((clean_pred == y.cpu()).float().mean()),
        "status": "ok", "error": None, "setup_s": float("nan"), "certify_s": float("nan"),
        "per_sample_s": float("nan"), "peak_mem_bytes": None, "mem_kind": None,
        "probabilistic": False, "alpha": None, "eps_grid": json.dumps(eps),
        "soundness_violations": None, "probabilistic_violations": None,
        "attack": canonical_json(spec.attack.model_dump()) if spec.attack.enabled else None,
        "attack_s": None if attack is None else attack.seconds,
        "started_at": pd.Timestamp.now(tz="UTC"), **context,
    }
    tables: dict[str, pd.DataFrame] = {}
    memory = PeakMemory(device)
    try:
        verifier = get_verifier(verifier_spec.name, **verifier_spec.options)
        with memory:
            _, row["setup_s"] = timed(
                lambda: verifier.prepare(loaded.model, tuple(x.shape[1:])), device
            )
            verifier.certify(x[:WARMUP_SAMPLES], norm, eps)
            cert, per_sample, total = _certify_batches(
                verifier, x, norm, eps, spec.batch_size, device
            )
        row["method"] = getattr(verifier, "method", verifier_spec.name)
        row.update(
            certify_s=total, per_sample_s=total / len(y), probabilistic=cert.probabilistic,
            alpha=cert.alpha,
        )
        tables = _certificate_tables(key, cert, per_sample, y.cpu(), indices, eps)
        if attack is not None and not cert.probabilistic:
            row["soundness_violations"] = _cross_check(tables, cert, attack, clean_pred,
                                                       y.cpu(), eps)
        elif cert.probabilistic and spec.attack.enabled:
            row["probabilistic_violations"] = _check_smoothing(
                tables["samples"], verifier, loaded.model, x, cert, eps, norm, spec.attack
            )
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="oom", error=str(exc).splitlines()[0][:500])
    except MemoryError as exc:
        row.update(status="oom", error=f"MemoryError: {exc}"[:500])
    except Exception as exc:  # a verifier failure must not stop the run
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
    row.update(peak_mem_bytes=memory.peak_bytes, mem_kind=memory.kind)
    row["finished_at"] = pd.Timestamp.now(tz="UTC")
    tables["cells"] = pd.DataFrame([row])
    return tables


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
    samples: pd.DataFrame, verifier: Any, model: nn.Module, x: torch.Tensor,
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


def run_matrix(
    spec: MatrixSpec,
    results_dir: Path,
    checkpoint_dir: Path,
    data_dir: Path | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    matrix_file: str | None = None,
) -> pd.DataFrame:
    """Run every cell of ``spec``; returns the per-cell rows of the whole results folder.
    ``matrix_file`` (where the spec was read from) is recorded in every cell row."""
    device = resolve_device(spec.device)
    dataset = load_dataset(spec.dataset, data_dir, download=spec.download)
    indices = eval_indices(len(dataset.y_test), spec.samples, spec.seed)
    x, y = dataset.x_test[indices].to(device), dataset.y_test[indices].to(device)
    store = ResultsStore(results_dir)
    done = set() if force else store.done_keys()
    context = {
        "run_id": time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
        "versions": canonical_json(library_versions()), "git_commit": git_commit(),
        "matrix": spec.name, "matrix_file": matrix_file,
    }
    models = [ensure_model(m, dataset, checkpoint_dir, device, progress, data_dir)
              for m in spec.models]
    cells = [(m, v, norm) for m in models for v in spec.verifiers for norm in spec.norms]
    attacks: dict[tuple[str, str], AttackOutcome] = {}
    ran = skipped = 0
    bar = tqdm(cells, desc=f"run {spec.name}", unit="cell", disable=not progress)
    for loaded, verifier_spec, norm in bar:
        key = cell_key(spec, loaded, verifier_spec, norm, device)
        if key in done:
            skipped += 1
            continue
        attack = None
        if spec.attack.enabled:
            if (loaded.sha256, norm) not in attacks:
                bar.set_postfix_str(f"{loaded.spec.name} / attack / l{norm}")
                a = spec.attack
                attacks[loaded.sha256, norm] = attack_grid(
                    loaded.model, x, spec.eps_for(norm), norm, a.steps, a.restarts,
                    a.bisection_steps, seed=spec.seed, batch_size=spec.batch_size,
                    targeted=a.targeted,
                )
            attack = attacks[loaded.sha256, norm]
        bar.set_postfix_str(f"{loaded.spec.name} / {verifier_spec.display} / l{norm}")
        tables = run_cell(spec, loaded, verifier_spec, norm, x, y, indices, device, key, context,
                          attack)
        store.write_cell(tables)
        ran += 1
    log(f"{ran} cell(s) run, {skipped} already done (use --force to recompute) -> {results_dir}")
    return store.read("cells")
