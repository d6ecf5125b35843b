"""Local Lipschitz certification (bound, bisection and estimate) and the complete
verifiers (exact MILP, branch and bound) on fixed seeded models and batches, next to the
global bound they refine.

Run: pytest tests/benchmarks/test_local_lipschitz_speed.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

from certbench.models import build_model
from certbench.verifiers import get_verifier
from certbench.verifiers.base import Verdict, verdict_code
from conftest import bench_rounds

CASES = {
    "mlp-digits": ("mlp", {"widths": [64, 64]}, (1, 8, 8), 64),
    "cnn-small-digits": ("cnn-small", {}, (1, 8, 8), 32),
}
EPS = [0.1, 0.25, 0.5, 1.0]


def _setup(case: str):
    arch, args, shape, batch = CASES[case]
    torch.manual_seed(0)
    model = build_model(arch, shape, 10, (0.5,), (0.5,), args).eval()
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    return model, shape, x


@pytest.mark.parametrize("options", [{"activation_bounds": "ibp"},
                                     {"activation_bounds": "crown"},
                                     {"activation_bounds": "ibp", "estimate_points": 0}],
                         ids=["ibp", "crown", "ibp-no-estimate"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_local_lipschitz(benchmark, case, options):
    model, shape, x = _setup(case)
    verifier = get_verifier("local-lipschitz", **options)
    verifier.prepare(model, shape)
    cert = benchmark.pedantic(verifier.certify, args=(x, "2", EPS),
                              rounds=bench_rounds(3), iterations=1)
    assert (cert.radius >= 0).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_global_lipschitz_reference(benchmark, case):
    model, shape, x = _setup(case)
    verifier = get_verifier("global-lipschitz")
    verifier.prepare(model, shape)
    cert = benchmark(verifier.certify, x, "2", EPS)
    assert len(cert.verdicts) == len(x)


@pytest.mark.parametrize("name", ["exact", "bab"])
def test_complete_small_mlp(benchmark, name):
    """The same decisions by both complete verifiers (the tests check they agree)."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, (0.5,), (0.5,), {"widths": [16, 16]}).eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    verifier = get_verifier(name)
    verifier.prepare(model, (1, 8, 8))
    cert = benchmark.pedantic(verifier.certify, args=(x, "inf", [0.01, 0.03]),
                              rounds=bench_rounds(2), iterations=1)
    assert len(cert.verdicts) == 4


@pytest.mark.parametrize("input_split_dims", [8, 0], ids=["input-splits", "relu-splits"])
def test_bab_on_a_five_input_network(benchmark, input_split_dims):
    """bab on the 5-40-40-4 network of test_bab (the shape of ACAS Xu) at balls CROWN
    leaves open: splitting the input box against splitting ReLUs, same decisions."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(5, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                                torch.nn.ReLU(), torch.nn.Linear(40, 4)).eval()
    x = torch.rand(6, 5, generator=torch.Generator().manual_seed(8))
    verifier = get_verifier("bab", time_limit_s=60, attack_restarts=1, attack_steps=1,
                            input_split_dims=input_split_dims)
    verifier.prepare(model, (5,))
    cert = benchmark.pedantic(verifier.certify, args=(x, "inf", [0.05, 0.15]),
                              rounds=bench_rounds(2), iterations=1)
    assert not (cert.verdicts == verdict_code(Verdict.TIMEOUT)).any()  # both decide every ball
