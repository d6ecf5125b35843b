"""Speed of global-Lipschitz certification against plain inference on the same batch and
model (the limit is one forward pass), and of its one-off setup.

Run: pytest tests/benchmarks --benchmark-enable --benchmark-group-by=param:case
Save a baseline with --benchmark-autosave; compare and fail on a regression with
--benchmark-compare --benchmark-compare-fail=mean:20%.
"""

from __future__ import annotations

import pytest
import torch

from certbench.models import build_model
from certbench.verifiers import get_verifier
from conftest import bench_rounds

CASES = {
    "mlp-digits": ("mlp", {"widths": [64, 64]}, (1, 8, 8), 360),
    "cnn-small-mnist": ("cnn-small", {"linear_size": 100}, (1, 28, 28), 256),
    "cnn-4c3f-mnist": ("cnn-4c3f", {}, (1, 28, 28), 256),
    "resnet-tiny-digits": ("resnet-tiny", {}, (1, 8, 8), 360),
}


def _setup(case: str):
    arch, args, shape, batch = CASES[case]
    torch.manual_seed(0)
    model = build_model(arch, shape, 10, (0.5,), (0.5,), args).eval()
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    return model, shape, x


@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_inference(benchmark, case):
    model, _, x = _setup(case)
    with torch.no_grad():
        logits = benchmark(model, x)
    assert logits.shape == (len(x), 10)


@pytest.mark.parametrize("bound", ["gloro", "lmt"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_certify(benchmark, case, bound):
    model, shape, x = _setup(case)
    verifier = get_verifier("global-lipschitz", bound=bound)
    verifier.prepare(model, shape)
    cert = benchmark(verifier.certify, x, "2", [0.1, 0.25, 0.5, 1.0])
    assert len(cert.verdicts) == len(x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_setup_lipschitz_bound(benchmark, case):
    model, shape, _ = _setup(case)
    verifier = get_verifier("global-lipschitz")
    benchmark.pedantic(verifier.prepare, args=(model, shape), rounds=bench_rounds(3),
                       iterations=1)
    assert verifier.lipschitz > 0
