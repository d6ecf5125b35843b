"""Datasets as float32 tensors in [0, 1] (N, C, H, W) with int64 labels.

- ``digits``: the 8x8 handwritten digits shipped inside scikit-learn (1797 images, no
  download); a fixed seeded split, 1437 train / 360 test.
- ``mnist``, ``fashion-mnist``: the original IDX ``.gz`` files in ``DATA_DIR/<name>/``.
- ``cifar10``: the python batches in ``DATA_DIR/cifar10/cifar-10-batches-py/``, read with
  an unpickler that only builds numpy arrays (a pickle may otherwise run code).
- ``cifar10-test100``: the first 100 CIFAR-10 test images as ERAN ships them
  (``DATA_DIR/eran_data/cifar10_test.csv``: ``label,p0,...`` with 0-255 pixels in HWC
  order), the evaluation set of third-party CIFAR networks; no training images.

``DATA_DIR`` is ``--data-dir``, else ``$CERTBENCH_DATA``, else ``./data``. Files are only
downloaded when asked (``download=True`` / ``--download``), and then checked against
their published md5; offline, a missing file is one error naming what is expected where.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from certbench.atomic import write_atomic
from certbench.errors import UserError


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_test.shape[1:])


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_IDX_FILES = {
    "mnist": (
        _MNIST_URL,
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": (
        _FASHION_URL,
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_ERAN_URL = "https://raw.githubusercontent.com/eth-sri/eran/8771d3158b2c64a360d5bdfd4433490863257dd6/data/"
_ERAN_CIFAR_MD5 = "dbfd8ef523350d947880c8d68ee8d622"

# mean/std of the training images, per channel (the model's Normalize layer)
_STATS = {
    "digits": ((0.3049,), (0.3758,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar10-test100": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
DATASETS = tuple(_STATS)


def default_data_dir() -> Path:
    return Path(os.environ.get("CERTBENCH_DATA", "data"))


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Load ``name`` (one of DATASETS); UserError naming the missing files if absent."""
    if name not in _STATS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name == "digits":
        parts = _digits()
    elif name == "cifar10":
        parts = _cifar10(data_dir / "cifar10", download)
    elif name == "cifar10-test100":
        parts = _eran_cifar(data_dir / "eran_data", download)
    else:
        parts = _idx_dataset(name, data_dir / name, download)
    mean, std = _STATS[name]
    return Dataset(name, *parts, num_classes=10, mean=mean, std=std)


def eval_indices(n_test: int, samples: int, seed: int = 0) -> torch.Tensor:
    """The evaluation subset: ``samples`` test indices from a permutation seeded by
    ``seed``, sorted; identical for every verifier and every run."""
    if samples > n_test:
        raise UserError(f"samples = {samples} exceeds the {n_test} test points of the dataset")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_test, generator=generator)[:samples].sort().values


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    return x[train], y[train], x[test], y[test]


def _fetch(url: str, target: Path, md5: str) -> None:
    """Download ``url`` to ``target`` (atomically, once its md5 matches)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as exc:
        raise UserError(f"could not download {url} ({exc}); place the file at {target}") from exc
    if hashlib.md5(data).hexdigest() != md5:
        raise UserError(f"download of {url} failed its md5 check; try again")
    write_atomic(target, data)


def _require(folder: Path, files: list[str], name: str) -> None:
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise UserError(
            f"{name}: missing {', '.join(missing)} in {folder}; place the files there, "
            "point --data-dir (or CERTBENCH_DATA) at their parent folder, or pass --download"
        )


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (magic: two zero bytes, dtype code 0x08 = uint8, rank)."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise UserError(f"{path} is not a readable gzip file ({exc}); download it again") from exc
    if raw[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    rank = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=rank, offset=4).astype(int)
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: {body.size} bytes for shape {tuple(dims)}")
    return body.reshape(tuple(dims))


def _idx_dataset(name: str, folder: Path, download: bool):
    url, files = _IDX_FILES[name]
    if download:
        for file, md5 in files.items():
            if not (folder / file).exists():
                _fetch(url + file, folder / file, md5)
    _require(folder, list(files), name)

    def images(file: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(folder / file).copy()).float().div(255)[:, None]

    def labels(file: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(folder / file).astype(np.int64))

    return (
        images("train-images-idx3-ubyte.gz"),
        labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"),
        labels("t10k-labels-idx1-ubyte.gz"),
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 batches contain: dicts, lists, numpy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar10(folder: Path, download: bool):
    batches = folder / _CIFAR_DIR
    if download and not all((batches / f).exists() for f in _CIFAR_FILES):
        archive = folder / "cifar-10-python.tar.gz"
        if not archive.exists():
            _fetch(_CIFAR_URL, archive, _CIFAR_MD5)
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
    _require(batches, _CIFAR_FILES, "cifar10")

    def read(file: str) -> tuple[torch.Tensor, torch.Tensor]:
        raw = (batches / file).read_bytes()
        try:
            batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise UserError(f"{batches / file} is not a CIFAR-10 batch ({exc})") from exc
        x = torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        return x.float().div(255), torch.tensor(batch[b"labels"], dtype=torch.int64)

    train = [read(f) for f in _CIFAR_FILES[:5]]
    x_test, y_test = read("test_batch")
    return torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train]), x_test, y_test


def _eran_cifar(folder: Path, download: bool):
    path = folder / "cifar10_test.csv"
    if download and not path.exists():
        _fetch(_ERAN_URL + "cifar10_test.csv", path, _ERAN_CIFAR_MD5)
    _require(folder, ["cifar10_test.csv"], "cifar10-test100")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise UserError(f"{path} is not ERAN's CIFAR-10 csv ({exc})") from exc
    if table.shape[1] != 1 + 32 * 32 * 3:
        raise UserError(f"{path}: expected 3073 columns (label, 32x32x3 pixels), "
                        f"got {table.shape[1]}")
    x = torch.from_numpy(table[:, 1:].reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2) / 255)
    y = torch.from_numpy(table[:, 0].astype(np.int64))
    empty = torch.zeros(0, 3, 32, 32)
    return empty, torch.zeros(0, dtype=torch.int64), x.float().contiguous(), y
