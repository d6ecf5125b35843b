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
