"""Datasets load in [0, 1] with the right shapes; missing files give one clear error."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from certbench.data import eval_indices, load_dataset
from certbench.errors import UserError


def test_digits_are_embedded_in_unit_range(digits):
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.min() >= 0 and digits.x_train.max() <= 1
    assert set(digits.y_test.tolist()) == set(range(10))


def test_mnist_from_the_original_idx_files(mnist_dir):
    mnist = load_dataset("mnist", mnist_dir)
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.x_test.min() == 0 and mnist.x_test.max() == 1
    assert mnist.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the known first labels
    assert abs(mnist.x_train.mean().item() - mnist.mean[0]) < 1e-3


def test_missing_dataset_files_are_named(tmp_path):
    with pytest.raises(UserError, match=r"missing .*t10k-images-idx3-ubyte.gz.* --download"):
        load_dataset("fashion-mnist", tmp_path)


def test_truncated_idx_file_is_refused(tmp_path, mnist_dir):
    folder = tmp_path / "mnist"
    shutil.copytree(mnist_dir / "mnist", folder)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-10]))
    with pytest.raises(UserError, match="truncated"):
        load_dataset("mnist", tmp_path)


def test_evaluation_subset_is_seeded_and_shared():
    a, b = eval_indices(360, 50, seed=3), eval_indices(360, 50, seed=3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 50
    assert not torch.equal(a, eval_indices(360, 50, seed=4))
    with pytest.raises(UserError, match="exceeds"):
        eval_indices(360, 361)


def _write_cifar_batches(folder, n=4):
    """Batches in the CIFAR-10 python format (a pickled dict of numpy arrays), with
    synthetic pixels: the real files are not available offline."""
    import pickle

    import numpy as np

    batches = folder / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(range(n))}
        (batches / name).write_bytes(pickle.dumps(batch, protocol=2))
    return batches


def test_cifar10_batches_load_as_chw_in_unit_range(tmp_path):
    batches = _write_cifar_batches(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.x_test.max() <= 1 and data.y_test.tolist() == [0, 1, 2, 3]
    import pickle

    import numpy as np
    raw = pickle.loads((batches / "test_batch").read_bytes())[b"data"]
    expected = torch.from_numpy(raw.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    torch.testing.assert_close(data.x_test, expected)


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > pwned.txt",))


def test_cifar10_loader_refuses_pickles_that_carry_code(tmp_path, monkeypatch):
    import pickle

    batches = _write_cifar_batches(tmp_path)
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": _Payload()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="refusing to load"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "pwned.txt").exists()


def test_download_checks_the_md5(tmp_path):
    """The download path, exercised on a file:// URL (no network here)."""
    import hashlib

    from certbench.data import _fetch

    source = tmp_path / "source.gz"
    source.write_bytes(b"payload")
    good = hashlib.md5(b"payload").hexdigest()
    _fetch(source.as_uri(), tmp_path / "out" / "a.gz", good)
    assert (tmp_path / "out" / "a.gz").read_bytes() == b"payload"
    with pytest.raises(UserError, match="md5"):
        _fetch(source.as_uri(), tmp_path / "out" / "b.gz", "0" * 32)
    assert not (tmp_path / "out" / "b.gz").exists()
    with pytest.raises(UserError, match="could not download"):
        _fetch((tmp_path / "absent").as_uri(), tmp_path / "out" / "c.gz", good)
