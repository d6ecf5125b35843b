"""Shared fixtures: the digits dataset, random models of every architecture, and small
models trained once per session with each recipe; the speed suites' ``--bench-rounds``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from certbench.data import load_dataset
from certbench.models import ARCHITECTURES, build_model
from certbench.training.train import train_model

_BENCH_ROUNDS: list[int | None] = [None]


def pytest_addoption(parser):
    parser.addoption("--bench-rounds", type=int, default=None,
                     help="timed rounds of every speed benchmark that fixes its own "
                     "(default: the suite's, 2-5); see docs/measurements.md's speed-gate settings")


def pytest_configure(config):
    _BENCH_ROUNDS[0] = config.getoption("--bench-rounds")


def bench_rounds(default: int) -> int:
    """Timed rounds of a speed benchmark: ``--bench-rounds`` if given, else ``default``."""
    return _BENCH_ROUNDS[0] or default


SHARED_DATA = Path(os.environ.get("CERTBENCH_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
"""The shared data folder beside the checkout; ``CERTBENCH_SHARED_DATA`` elsewhere (the
GPU run carries its own copy)."""
DIGITS_SHAPE = (1, 8, 8)


def interrupt_training(monkeypatch, after_steps: int) -> None:
    """Make training raise KeyboardInterrupt at its ``after_steps + 1``-th loss call (as if
    killed there); ``monkeypatch.undo()`` lets the next run resume."""
    from certbench.training import train

    real, calls = train.make_loss, [0]

    def interrupting(*make_args):
        loss = real(*make_args)

        def wrapped(*loss_args):
            calls[0] += 1
            if calls[0] == after_steps + 1:
                raise KeyboardInterrupt
            return loss(*loss_args)

        return wrapped

    monkeypatch.setattr(train, "make_loss", interrupting)


def random_model(arch: str, seed: int = 0, **arch_args) -> torch.nn.Module:
    """An untrained model with random weights (and random BatchNorm statistics)."""
    torch.manual_seed(seed)
    model = build_model(arch, DIGITS_SHAPE, 10, (0.3,), (0.4,), arch_args)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


RANDOM_MODELS = {
    "mlp": {"widths": [32, 32]},
    "cnn-small": {},
    "cnn-4c3f": {"channels": [8, 8, 16, 16], "dense": [64, 64]},
    "cnn-dm-large": {"channels": [4, 4, 8, 8, 8], "dense": 32},
    "resnet-tiny": {"channels": 8, "batchnorm": True},
}
assert set(RANDOM_MODELS) == set(ARCHITECTURES)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained(digits, tmp_path_factory) -> dict[str, torch.nn.Module]:
    """Small models trained on digits with each recipe (a few seconds in all)."""
    folder = tmp_path_factory.mktemp("trained")
    recipes = {
        "mlp-standard": ("mlp", {"widths": [64, 64]}, "standard", {"epochs": 10}),
        "mlp-gloro": ("mlp", {"widths": [64, 64]}, "gloro", {"epochs": 15, "eps": 0.5}),
        "mlp-lmt": ("mlp", {"widths": [64, 64]}, "lmt", {"epochs": 15, "c": 0.5}),
        "cnn-small-gloro": ("cnn-small", {}, "gloro", {"epochs": 8, "eps": 0.3}),
        "mlp-noise": ("mlp", {"widths": [64, 64]}, "noise", {"epochs": 10, "sigma": 0.25}),
    }
    models = {}
    for name, (arch, arch_args, recipe, args) in recipes.items():
        model, _ = train_model(folder / name, digits, arch, arch_args, recipe, args,
                               progress=False)
        models[name] = model.eval()
    return models


@pytest.fixture
def mnist_dir() -> Path:
    if not (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST files not found in {SHARED_DATA / 'mnist'} (the shared data folder)")
    return SHARED_DATA


def time_margin_bounds(benchmark, verifier, x, spec, eps: float, rounds: int = 3,
                       norm: str = "inf"):
    """The speed suites' measurement of one verifier's margin bounds: in the plain test
    run once, as a test; under --benchmark-enable a warm-up, one call with peak memory
    into extra_info, then ``rounds`` timed calls. Returns the bounds."""
    from certbench.run.measure import PeakMemory

    def bound():
        with torch.no_grad():
            return verifier.margin_lower_bounds(x, spec, eps, norm)

    if benchmark.disabled:
        return benchmark(bound)
    bound()
    with PeakMemory(x.device) as memory:
        result = bound()
    benchmark.extra_info["peak_mem_bytes"] = memory.peak_bytes
    benchmark.pedantic(bound, rounds=bench_rounds(rounds), iterations=1)
    return result
