"""Local Lipschitz certification (bound and bisection), its sampled estimate apart (a
diagnostic the harness runs untimed), and the complete
verifiers (exact MILP, branch and bound) on fixed seeded models and batches, next to the
global bound they refine; and one round of bab's bounding on VNN-COMP's mnist_fc 256x4.

Run: pytest tests/benchmarks/test_local_lipschitz_speed.py --benchmark-enable
"""

from __future__ import annotations

import math

import pytest
import torch

from certbench.io.onnx_import import load_onnx
from certbench.io.vnnlib import read_vnnlib
from certbench.models import build_model
from certbench.verifiers import get_verifier
from certbench.verifiers.base import Verdict, verdict_code
from certbench.verifiers.bound_propagation import Ball, BoundPropagator, TracedNetwork
from certbench.verifiers.bound_propagation.propagation import AlphaOptimiser
from certbench.verifiers.branch_and_bound.branching import babsr
from certbench.verifiers.branch_and_bound.domains import ALPHA_LR, DomainBounder, Domains
from certbench.verifiers.specification import OutputSpec
from conftest import SHARED_DATA, bench_rounds

CASES = {
    "mlp-digits": ("mlp", {"widths": [64, 64]}, (1, 8, 8), 64),
    "cnn-small-digits": ("cnn-small", {}, (1, 8, 8), 32),
    "cnn-4c3f-minmax-digits": ("cnn-4c3f", {"activation": "minmax", "channels": [8, 8, 16, 16],
                                            "dense": [64, 64]}, (1, 8, 8), 8),
}
EPS = [0.1, 0.25, 0.5, 1.0]


def _setup(case: str):
    arch, args, shape, batch = CASES[case]
    torch.manual_seed(0)
    model = build_model(arch, shape, 10, (0.5,), (0.5,), args).eval()
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    return model, shape, x


@pytest.mark.parametrize("options", [{"activation_bounds": "ibp"},
                                     {"activation_bounds": "crown"}], ids=["ibp", "crown"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_local_lipschitz(benchmark, case, options):
    model, shape, x = _setup(case)
    verifier = get_verifier("local-lipschitz", **options)
    verifier.prepare(model, shape)
    cert = benchmark.pedantic(verifier.certify, args=(x, "2", EPS),
                              rounds=bench_rounds(3), iterations=1)
    assert (cert.radius >= 0).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_lipschitz_estimate(benchmark, case):
    model, shape, x = _setup(case)
    verifier = get_verifier("local-lipschitz", activation_bounds="ibp")
    verifier.prepare(model, shape)
    columns = benchmark.pedantic(verifier.diagnostics, args=(x, "2", EPS),
                                 rounds=bench_rounds(3), iterations=1)
    assert (columns["lipschitz_estimate"] > 0).all()


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


def test_bab_bounding_round_on_mnist_fc_256x4(benchmark):
    """One round of bab's bounding, the part that takes 95 % of its time on VNN-COMP's
    mnist_fc: 10 Adam steps of beta-CROWN on 1024 subdomains of the 256x4 network's
    prop_0 at eps 0.05 (a property bab leaves open at a quarter of the competition's
    timeout), made by 9 BaBSR splits of the root; the root is alpha-CROWN's, as in bab."""
    folder = SHARED_DATA / "vnncomp2022" / "mnist_fc"
    if not (folder / "instances.csv").exists():
        pytest.skip(f"{folder} not found (the shared data folder)")
    network = load_onnx(folder / "onnx" / "mnist-net_256x4.onnx")
    region = read_vnnlib(folder / "vnnlib" / "prop_0_0.05.vnnlib", 784, 10).regions[0]
    spec = OutputSpec(tuple((torch.from_numpy(c).float(), torch.from_numpy(d).float())
                            for c, d in region.constraints))
    c_all, d_all, owner = spec.stacked()
    lower, upper = (torch.from_numpy(t).float().reshape(1, 1, 28, 28)
                    for t in (region.lower, region.upper))
    prop = BoundPropagator(TracedNetwork(network.module.eval(), network.input_shape))
    ball = Ball((lower + upper) / 2, (upper - lower) / 2, "inf", clip=False)
    with torch.no_grad():
        crown = prop.intermediate_bounds(ball, "crown")
        root = AlphaOptimiser(prop, c_all[None], ball, crown, ALPHA_LR)
        best = root.run(prop.backward(prop.net.output, c_all[None], ball, crown), 20)[0]
        worst = int(owner[int((best - d_all).argmin())])  # the disjunct bab takes first
        rows = (owner == worst).nonzero().flatten()
        c, d = spec.disjuncts[worst]
        domains = Domains(
            lower={i: b[0].clone() for i, b in root.reference.items()},
            upper={i: b[1].clone() for i, b in root.reference.items()},
            signs={i: torch.zeros_like(b[0], dtype=torch.int8) for i, b in root.reference.items()},
            alphas={a: p[:, rows].detach().clone()
                    for a, p in root.alphas[prop.net.output].items()},
            betas={i: b[0].new_zeros(1, len(rows), *b[0].shape[1:])
                   for i, b in root.reference.items()},
            value=torch.full((1,), -math.inf), depth=torch.zeros(1, dtype=torch.long),
            branch=torch.full((1, 2), -1, dtype=torch.long))
        bounder = DomainBounder(prop, ball, c, d)
        for _ in range(10):  # 1 -> 1024 domains
            coefficients = bounder.bound(domains, 0, math.inf)
            domains.branch = babsr(prop, domains.lower, domains.upper, coefficients)
            domains = domains.split(prop.relu_inputs)

    @torch.no_grad()
    def bound_round():
        batch = domains.take(slice(None))
        bounder.bound(batch, 10, math.inf, record=False)
        return batch

    batch = benchmark.pedantic(bound_round, rounds=bench_rounds(3), iterations=1)
    assert len(batch) == 1024 and (batch.value > -math.inf).all()
