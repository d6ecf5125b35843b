"""Randomized smoothing throughput: CERTIFY's noisy samples per second against plain
batched inference of the same number of (noise-free) inputs on the same model and device;
the ratio is the cost of drawing the noise and counting.

Run: pytest tests/benchmarks/test_smoothing_speed.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

from certbench.models import build_model
from certbench.verifiers import get_verifier

N = 20_000
BATCH = 10_000
CASES = {
    "mlp-digits": ("mlp", {"widths": [64, 64]}, (1, 8, 8)),
    "cnn-small-mnist": ("cnn-small", {"linear_size": 100}, (1, 28, 28)),
}


def _model(case: str):
    arch, args, shape = CASES[case]
    torch.manual_seed(0)
    return build_model(arch, shape, 10, (0.5,), (0.5,), args).eval(), shape


@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_inference_of_n_inputs(benchmark, case):
    model, shape = _model(case)
    x = torch.rand(BATCH, *shape, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def infer():
        return [model(x).argmax(1) for _ in range(N // BATCH)]

    assert sum(len(p) for p in benchmark(infer)) == N


@pytest.mark.parametrize("case", sorted(CASES))
def test_certify_one_sample_with_n_noisy_copies(benchmark, case):
    model, shape = _model(case)
    verifier = get_verifier("smoothing", sigma=0.25, n0=100, n=N, batch_size=BATCH)
    verifier.prepare(model, shape)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    cert = benchmark(verifier.certify, x, "2", [0.25])
    assert int(cert.columns["count_a"][0]) <= N
