"""Model provisioning: every model of a matrix as a module on the CPU, with its card and
the sha256 that cell keys hash. Recipe models are trained where their checkpoint is
missing (here, or as `TrainJob` tasks of a remote executor); checkpoints are loaded;
ONNX files are converted (`certbench.io.onnx_import`). A recipe checkpoint's name hashes
everything that shapes its weights (`model_stem`), so a changed hyperparameter trains a
new model instead of reusing a stale one."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from certbench.atomic import write_atomic
from certbench.data import Dataset, default_data_dir, load_dataset
from certbench.errors import UserError
from certbench.io.onnx_import import as_classifier, load_onnx, read_onnx_bytes
from certbench.matrix import MatrixSpec, ModelSpec
from certbench.models import checkpoint_paths, file_sha256, load_checkpoint
from certbench.provenance import canonical_json
from certbench.run.cells import Subject
from certbench.run.executors import Executor
from certbench.training.recipes import NAMING_NEUTRAL, recipe_args
from certbench.training.train import train_model
from certbench.zoo import PREFIX as ZOO_PREFIX
from certbench.zoo import network_stem


def model_stem(spec: ModelSpec, dataset: str, checkpoint_dir: Path) -> Path:
    """Where a recipe's checkpoint lives: the name plus a hash of everything that shapes
    the trained weights, so that changing a hyperparameter trains a new model. A given
    checkpoint is its own stem; ``zoo:NAME`` is the zoo's network (`certbench.zoo`)."""
    if spec.checkpoint is not None and spec.checkpoint.startswith(ZOO_PREFIX):
        return network_stem(spec.checkpoint)
    if spec.checkpoint is not None:
        return checkpoint_paths(spec.checkpoint)[0].with_suffix("")
    args = {k: v for k, v in recipe_args(spec.recipe, spec.recipe_args).items()
            if k not in NAMING_NEUTRAL or v != NAMING_NEUTRAL[k]}
    identity = {
        "dataset": dataset, "arch": spec.arch, "arch_args": spec.arch_args,
        "recipe": spec.recipe, "recipe_args": args, "seed": spec.seed,
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
                    device: torch.device) -> Subject:
    """A third-party ONNX network as a classifier of the dataset (onnx_import.py). Its
    card records the file and the normalisation put in front; ``sha256`` is the file's."""
    path = onnx_path(spec, data_dir)
    norm = spec.normalization
    model = as_classifier(load_onnx(path), dataset.input_shape, dataset.num_classes,
                          norm.mean if norm else None, norm.std if norm else None)
    card = {"arch": "onnx", "recipe": "external", "onnx": str(path), "dataset": dataset.name,
            "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
            "normalization": norm.model_dump() if norm else None}
    return Subject(spec.name, model.to(device), card,
                   hashlib.sha256(read_onnx_bytes(path)).hexdigest())


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
    for suffix in (".safetensors", ".json"):
        write_atomic(stem.with_name(stem.name + suffix), files[suffix])


def ensure_models(
    spec: MatrixSpec, dataset: Dataset, checkpoint_dir: Path, device: torch.device,
    executor: Executor, progress: bool, data_dir: str | Path | None = None,
) -> list[Subject]:
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
        loaded.append(Subject(m.name, model.eval(), card,
                              file_sha256(checkpoint_paths(stem)[0])))
    return loaded
