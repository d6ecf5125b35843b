"""Architectures by name, and checkpoints as safetensors weights plus a JSON card.

Every architecture starts with a `Normalize` layer, so models take inputs in [0, 1] and
every epsilon is in pixel space. Architectures use only layers that the verifiers have
sound rules for (Linear, Conv2d, ReLU, Flatten, AvgPool2d, BatchNorm in eval mode,
residual additions).

A checkpoint ``STEM`` is two files: ``STEM.safetensors`` (the state dict) and
``STEM.json`` (the card: architecture and arguments, dataset, input shape, classes,
normalisation, recipe and hyperparameters, seed, clean accuracy, training time, library
versions, and the sha256 of the weights file). Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from certbench.atomic import write_atomic
from certbench.errors import UserError
from certbench.verifiers.layers import MinMax

CARD_FORMAT = 1


class Normalize(nn.Module):
    """(x - mean) / std per channel, the first layer of every model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ResidualBlock(nn.Module):
    """relu(x + conv(relu(conv(x)))), channels and size kept; BatchNorm optional."""

    def __init__(self, channels: int, batchnorm: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, channels, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(channels))
        layers += [nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(channels))
        self.branch = nn.Sequential(*layers)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.branch(x))


def mlp(input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (64, 64)) -> list:
    """Dense ReLU network with the given hidden widths."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(torch.tensor(input_shape).prod())
    for hidden in widths:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return layers + [nn.Linear(width, num_classes)]


def cnn_small(
    input_shape: Sequence[int], num_classes: int, width: int = 4, linear_size: int = 128
) -> list:
    """CROWN-IBP's small model (model_cnn_2layer): two 4x4 stride-2 convolutions with
    4*width and 8*width channels, then two dense layers."""
    c, h, w = input_shape
    return [
        nn.Conv2d(c, 4 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4 * width, 8 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * width * (h // 4) * (w // 4), linear_size),
        nn.ReLU(),
        nn.Linear(linear_size, num_classes),
    ]


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "minmax": MinMax}
"""The activations an architecture with an ``activation`` argument takes."""


def cnn_4c3f(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (32, 32, 64, 64),
    dense: Sequence[int] = (512, 512),
    activation: str = "relu",
    init: str = "default",
) -> list:
    """GloRo's MNIST 4C3F model: conv 3x3, conv 4x4 stride 2, conv 3x3, conv 4x4 stride 2,
    then dense layers. ``activation``: ``"relu"`` or ``"minmax"`` (GroupSort of size 2,
    `certbench.verifiers.layers.MinMax`, as GloRo's reference library builds it);
    ``init``: torch's ``"default"`` or ``"orthogonal"`` (orthogonal weights, zero
    biases: the reference library's Keras initialisation)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
    if init not in ("default", "orthogonal"):
        raise ValueError("init must be 'default' or 'orthogonal'")
    if activation == "minmax" and any(width % 2 for width in (*channels, *dense)):
        raise ValueError("MinMax pairs channels: channels and dense widths must be even")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for i, out in enumerate(channels):
        if i % 2 == 0:
            layers += [nn.Conv2d(c, out, 3, padding=1), ACTIVATIONS[activation]()]
        else:
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), ACTIVATIONS[activation]()]
            h, w = h // 2, w // 2
        c = out
    layers.append(nn.Flatten())
    width = c * h * w
    for hidden in dense:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    if init == "orthogonal":
        for layer in layers:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(layer.weight)
                nn.init.zeros_(layer.bias)
    return layers


def cnn_dm_large(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (64, 64, 128, 128, 128),
    dense: int = 512,
) -> list:
    """IBP's "large" model (Gowal et al. 2018, Table 1; DM-large in CROWN-IBP): five 3x3
    convolutions, the third with stride 2 (64, 64, 128, 128, 128 channels), dense 512."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for i, out in enumerate(channels):
        stride = 2 if i == 2 else 1
        layers += [nn.Conv2d(c, out, 3, stride=stride, padding=1), nn.ReLU()]
        c, h, w = out, (h - 1) // stride + 1, (w - 1) // stride + 1
    return layers + [nn.Flatten(), nn.Linear(c * h * w, dense), nn.ReLU(),
                     nn.Linear(dense, num_classes)]


def resnet_tiny(
    input_shape: Sequence[int],
    num_classes: int,
    channels: int = 16,
    blocks: int = 2,
    hidden: int = 100,
    batchnorm: bool = False,
) -> list:
    """A stem convolution, ``blocks`` residual blocks, 2x2 average pooling, two dense
    layers: small, but a general graph (skip connections) for the verifiers."""
    c, h, w = input_shape
    layers: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU()]
    layers += [ResidualBlock(channels, batchnorm) for _ in range(blocks)]
    layers += [
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * (h // 2) * (w // 2), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return layers


ARCHITECTURES: dict[str, Callable[..., list]] = {
    "mlp": mlp,
    "cnn-small": cnn_small,
    "cnn-4c3f": cnn_4c3f,
    "cnn-dm-large": cnn_dm_large,
    "resnet-tiny": resnet_tiny,
}


def build_model(
    arch: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    arch_args: dict[str, Any] | None = None,
) -> nn.Sequential:
    """The architecture ``arch`` with ``Normalize(mean, std)`` as its first layer."""
    if arch not in ARCHITECTURES:
        raise UserError(
            f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}"
        )
    try:
        layers = ARCHITECTURES[arch](tuple(input_shape), num_classes, **(arch_args or {}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad arch_args for {arch!r}: {exc}") from exc
    return nn.Sequential(Normalize(mean, std), *layers)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_paths(stem: str | Path) -> tuple[Path, Path]:
    """(weights, card) paths for a stem, also accepting either file's own path."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(model: nn.Module, card: dict[str, Any], stem: str | Path) -> Path:
    """Write weights and card atomically; returns the weights path. The card gains
    ``format`` and ``weights_sha256``."""
    weights, card_path = checkpoint_paths(stem)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights, lambda path: save_file(state, str(path)))
    card = dict(card, format=CARD_FORMAT, weights_sha256=file_sha256(weights))
    write_atomic(card_path, json.dumps(card, indent=2, sort_keys=True) + "\n")
    return weights


def _looks_like_pickle(path: Path) -> bool:
    """Pickle protocol 2-5 header, or the zip container of ``torch.save``."""
    head = path.read_bytes()[:2]
    return head == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                 b"\x05"))


def load_checkpoint(stem: str | Path) -> tuple[nn.Sequential, dict[str, Any]]:
    """Load a model and its card; UserError with the remedy on any mismatch."""
    weights, card_path = checkpoint_paths(stem)
    for path in (weights, card_path):
        if not path.exists():
            raise UserError(f"checkpoint file {path} not found; train it with `certbench train`")
    try:
        card = json.loads(card_path.read_text())
        arch, input_shape = card["arch"], card["input_shape"]
        num_classes, norm = card["num_classes"], card["normalization"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"model card {card_path} is malformed ({exc}); retrain the model") from exc
    try:
        state = load_file(str(weights))  # parses a header and raw tensors; runs no code
    except (SafetensorError, OSError, ValueError) as exc:
        if _looks_like_pickle(weights):
            raise UserError(
                f"{weights} is a pickle, not safetensors; certbench never unpickles "
                "checkpoints (a pickle can run code). Convert it with "
                "safetensors.torch.save_file."
            ) from exc
        raise UserError(f"{weights} is corrupted or truncated ({exc}); retrain it") from exc
    if card.get("weights_sha256") not in (None, file_sha256(weights)):
        raise UserError(
            f"{weights} does not match the sha256 recorded in {card_path}; the file was "
            "changed or truncated: retrain or restore it"
        )
    model = build_model(
        arch, input_shape, num_classes, norm["mean"], norm["std"], card.get("arch_args")
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(
            f"weights in {weights} do not fit the card's architecture {arch!r} "
            f"{card.get('arch_args')}: {' '.join(first[:3])[:300]}"
        ) from exc
    return model.eval(), card
