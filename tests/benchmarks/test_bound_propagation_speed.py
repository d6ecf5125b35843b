"""Time and peak memory of the engine's methods against auto_LiRPA (when installed) on
fixed seeded networks and batches.

Run: pytest tests/benchmarks/test_bound_propagation_speed.py --benchmark-enable
     --benchmark-group-by=param:case --benchmark-columns=mean,stddev,rounds
Peak memory of one call is stored in each benchmark's extra_info (peak_mem_bytes) and
shown with --benchmark-json; the engine's bound is checked against auto_LiRPA's.
"""

from __future__ import annotations

import pytest
import torch

from certbench.models import build_model
from certbench.verifiers import get_verifier
from certbench.verifiers.bound_propagation import margin_spec
from certbench.verifiers.lirpa import lirpa_status
from conftest import time_margin_bounds

CASES = {  # architecture, arguments, input shape, batch, l_inf eps
    "mlp-digits": ("mlp", {"widths": [64, 64]}, (1, 8, 8), 64, 0.02),
    "cnn-small-mnist": ("cnn-small", {"linear_size": 100}, (1, 28, 28), 4, 0.02),
    # conv + BatchNorm rows as windows (`Elementwise.backward_rows`)
    "resnet-bn-cifar": ("resnet-tiny", {"channels": 8, "blocks": 1, "batchnorm": True},
                        (3, 32, 32), 1, 2 / 255),
    # MinMax's relaxation (`operators.MinMax`) on a narrowed GloRo 4C3F
    "cnn-4c3f-minmax-digits": ("cnn-4c3f", {"activation": "minmax", "channels": [8, 8, 16, 16],
                                            "dense": [64, 64]}, (1, 8, 8), 4, 0.02),
}
# auto_LiRPA would trace MinMax as relu, sub and cat; its agreement is not checked there
LIRPA_CASES = sorted(set(CASES) - {"cnn-4c3f-minmax-digits"})
METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]
LIRPA, LIRPA_DETAIL = lirpa_status()


def _case(case: str):
    arch, args, shape, batch, eps = CASES[case]
    torch.manual_seed(0)
    model = build_model(arch, shape, 10, (0.5,), (0.5,), args).eval()
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    spec = margin_spec(model(x).argmax(1), 10).detach()
    return model, shape, x, spec, eps


def _run(benchmark, name: str, case: str) -> torch.Tensor:
    model, shape, x, spec, eps = _case(case)
    verifier = get_verifier(name)
    verifier.prepare(model, shape)
    return time_margin_bounds(benchmark, verifier, x, spec, eps, rounds=3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_engine(benchmark, case, method):
    lower = _run(benchmark, method, case)
    assert torch.isfinite(lower).all()


@pytest.mark.skipif(not LIRPA, reason=f"optional backend absent: {LIRPA_DETAIL}")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", LIRPA_CASES)
def test_auto_lirpa(benchmark, case, method):
    lower = _run(benchmark, f"lirpa:{method}", case)
    model, shape, x, spec, eps = _case(case)
    ours = get_verifier(method)
    ours.prepare(model, shape)
    with torch.no_grad():
        engine = ours.margin_lower_bounds(x, spec, eps, "inf")
    if method == "alpha-crown":  # both optimise; auto_LiRPA's may gain more per step, so
        reference = get_verifier("lirpa:crown")  # ours is held to its CROWN
        reference.prepare(model, shape)
        lower = reference.margin_lower_bounds(x, spec, eps, "inf")
    assert (engine >= lower - 1e-4 * lower.abs().clamp(min=1)).all()  # at least as tight
