"""Randomized smoothing throughput: CERTIFY's noisy samples per second against plain
batched inference of the same number of (noise-free) inputs on the same model, device and
batch size (the one CERTIFY measured as fastest in ``prepare``); the ratio of the medians
is the cost of drawing the noise and counting. Plain inference reads ``N`` distinct
inputs (once per point), as CERTIFY reads its ``N`` noise draws. CERTIFY certifies
``points`` points (1, or 50 as in a matrix's batches, which share one draw of the noise)
with ``N`` draws each (plus its 100 selection draws, 0.5 % more forward passes); its
noise is drawn in ``prepare`` (the verifier's setup, timed apart by the harness) and
reused as its image under the model's leading affine steps (`affine_head`: the MLP's
normalisation and first Linear layer, the CNN's normalisation), so CERTIFY skips steps
that plain inference computes, and its ratio can fall below 1.

The two tests time each side in a block of rounds of its own, so a machine whose speed
drifts between the blocks (a virtual machine's stolen time moved one of them by 2x here)
moves their ratio with it; the third alternates the two, one call of each per round, and
reports the median of the per-round ratios (``extra_info["ratio"]``, printed with ``-s``),
which drift common to a round cancels from.

Run: pytest tests/benchmarks/test_smoothing_speed.py --benchmark-enable -s
"""

from __future__ import annotations

import functools
import statistics
import time

import pytest
import torch

from certbench.models import build_model
from certbench.verifiers import get_verifier
from conftest import bench_rounds

N = 20_000
POINTS = (1, 50)
CASES = {
    "mlp-digits": ("mlp", {"widths": [64, 64]}, (1, 8, 8)),
    "cnn-small-mnist": ("cnn-small", {"linear_size": 100}, (1, 28, 28)),
}


@functools.cache
def _batch(case: str) -> int:
    """The batch size CERTIFY measures as fastest, measured once for both tests."""
    return _prepared(case, 1, None)[1].batch


def _prepared(case: str, points: int, batch_size: int | None = -1):
    arch, args, shape = CASES[case]
    torch.manual_seed(0)
    model = build_model(arch, shape, 10, (0.5,), (0.5,), args).eval()
    batch_size = _batch(case) if batch_size == -1 else batch_size
    verifier = get_verifier("smoothing", sigma=0.25, n0=100, n=N, batch_size=batch_size)
    verifier.prepare(model, shape)  # draws the noise once (setup, not timed here)
    x = torch.rand(points, *shape, generator=torch.Generator().manual_seed(0))
    return model, verifier, x


def _plain_inference(model, verifier, x):
    """Plain batched inference of ``len(x) * N`` distinct inputs, ``verifier.batch`` at a
    time."""
    inputs = torch.rand(N, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    batch, points = verifier.batch, len(x)

    @torch.inference_mode()
    def infer():
        return [model(inputs[i : i + batch]).argmax(1)
                for _ in range(points) for i in range(0, N, batch)]

    return infer


@pytest.mark.parametrize("points", POINTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_inference_of_the_same_number_of_inputs(benchmark, case, points):
    infer = _plain_inference(*_prepared(case, points))
    assert sum(len(p) for p in benchmark(infer)) == points * N


@pytest.mark.parametrize("points", POINTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_certify_with_n_noisy_copies_per_point(benchmark, case, points):
    _, verifier, x = _prepared(case, points)
    cert = benchmark(verifier.certify, x, "2", [0.25])
    assert (cert.columns["noise_draws"] == N + 100).all()


@pytest.mark.parametrize("points", POINTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_certify_over_plain_inference_alternating(benchmark, case, points):
    """One round = plain inference then CERTIFY (the two tests above); the benchmark's
    time is a round's, ``extra_info`` has the median per-round ratio and both medians."""
    model, verifier, x = _prepared(case, points)
    infer = _plain_inference(model, verifier, x)
    plain, certify = [], []

    def one_round():
        for seconds, call in ((plain, infer), (certify, lambda: verifier.certify(x, "2", [0.25]))):
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)

    if benchmark.disabled:
        benchmark(one_round)
        assert len(plain) == len(certify) == 1
        return
    benchmark.pedantic(one_round, rounds=bench_rounds(15 if points == 1 else 5),
                       warmup_rounds=1, iterations=1)
    plain, certify = plain[1:], certify[1:]  # the warm-up round
    ratio = statistics.median(c / p for c, p in zip(certify, plain, strict=True))
    benchmark.extra_info.update(ratio=ratio, plain_median_s=statistics.median(plain),
                                certify_median_s=statistics.median(certify))
    print(f"\n{case}, {points} point(s): CERTIFY / plain inference = {ratio:.3f} "
          f"(median of {len(plain)} alternating rounds; medians "
          f"{statistics.median(certify) * 1e3:.1f} / {statistics.median(plain) * 1e3:.1f} ms)")
