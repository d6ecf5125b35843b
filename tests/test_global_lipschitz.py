"""Soundness of the global-Lipschitz verifier: the bounds dominate every slope that
sampling and gradient ascent can find, the GloRo radius is exact for linear classifiers,
and PGD never flips a prediction inside a certified radius."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from certbench.run.attacks import pgd
from certbench.verifiers import UnsupportedLayerError, Verdict, get_verifier, verdict_code
from certbench.verifiers.bound_propagation import graph as traced_graph
from certbench.verifiers.bound_propagation.operators import Activation
from certbench.verifiers.global_lipschitz import LipschitzGraph
from conftest import DIGITS_SHAPE, RANDOM_MODELS, random_model


def jacobian_norms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """sigma_max of the input-output Jacobian at each point."""
    def single(v):
        return model(v[None])[0]
    jac = torch.func.vmap(torch.func.jacrev(single))(x)  # (n, classes, *input)
    return torch.linalg.matrix_norm(jac.flatten(2), ord=2)


def ascend_difference_quotient(f, shape, steps=100, seed=0) -> float:
    """max over pairs of ||f(a) - f(b)|| / ||a - b|| by gradient ascent from random pairs."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(64, *shape, generator=gen).requires_grad_(True)
    b = (a.detach() + 0.05 * torch.randn(64, *shape, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=0.01)
    best = 0.0
    for _ in range(steps):
        ratio = (f(a) - f(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


@pytest.mark.parametrize("arch", sorted(RANDOM_MODELS))
def test_network_bound_dominates_sampled_and_ascended_slopes(arch):
    model = random_model(arch, **RANDOM_MODELS[arch])
    bound = LipschitzGraph(model, DIGITS_SHAPE).bounds().network.item()
    x = torch.rand(200, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(1))
    sampled = jacobian_norms(model, x).max().item()
    ascended = ascend_difference_quotient(model, DIGITS_SHAPE)
    assert sampled <= bound
    assert ascended <= bound
    assert sampled > 0  # the model is not constant, so the comparison means something


@pytest.mark.parametrize("arch", sorted(RANDOM_MODELS))
def test_pairwise_gloro_bound_dominates_margin_slopes(arch):
    model = random_model(arch, seed=3, **RANDOM_MODELS[arch])
    k = LipschitzGraph(model, DIGITS_SHAPE).bounds().pairwise()
    x = torch.rand(100, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(2))
    jac = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None])[0]))(x).flatten(2)
    for i, j in [(0, 1), (3, 7), (9, 2)]:
        slope = (jac[:, i] - jac[:, j]).norm(dim=1).max().item()
        quotient = ascend_difference_quotient(
            lambda v, i=i, j=j: (model(v)[:, i] - model(v)[:, j])[:, None], DIGITS_SHAPE,
            steps=50,
        )
        assert max(slope, quotient) <= k[i, j].item()


def test_linear_classifier_gets_its_exact_radius():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.rand(50, *DIGITS_SHAPE)
    with torch.no_grad():
        f = model(x).double()
    w = model[1].weight.detach().double()
    y = f.argmax(1)
    exact = torch.tensor([
        min((f[n, y[n]] - f[n, j]) / (w[y[n]] - w[j]).norm() for j in range(10) if j != y[n])
        for n in range(len(x))
    ])
    gloro = get_verifier("global-lipschitz", bound="gloro")
    gloro.prepare(model, DIGITS_SHAPE)
    cert = gloro.certify(x, "2", [0.1])
    assert torch.equal(cert.prediction, y)
    torch.testing.assert_close(cert.radius, exact, rtol=1e-4, atol=1e-4)
    assert (cert.radius <= exact).all()  # the float allowance only ever shrinks radii
    lmt = get_verifier("global-lipschitz", bound="lmt")
    lmt.prepare(model, DIGITS_SHAPE)
    lmt_radius = lmt.certify(x, "2", [0.1]).radius
    margin = (f.gather(1, y[:, None]) - f).scatter(1, y[:, None], math.inf).min(1).values
    expected = margin / (math.sqrt(2) * torch.linalg.matrix_norm(w, ord=2))
    torch.testing.assert_close(lmt_radius, expected, rtol=1e-4, atol=1e-4)
    assert (lmt_radius <= cert.radius + 1e-9).all()  # GloRo is never looser than LMT


def test_pgd_finds_the_boundary_just_beyond_the_exact_radius():
    """The attack used below is strong enough to matter: on a linear classifier it flips
    points at 1.05x the exact radius (points chosen so the ball stays in [0, 1])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = 0.48 + 0.04 * torch.rand(40, *DIGITS_SHAPE)
    verifier = get_verifier("global-lipschitz")
    verifier.prepare(model, DIGITS_SHAPE)
    cert = verifier.certify(x, "2", [0.01])
    inside = cert.radius * 1.05 < 0.48  # an l2 ball of radius < 0.48 stays inside [0, 1]
    _, success = pgd(model, x[inside], cert.prediction[inside], cert.radius[inside].float() * 1.05,
                     "2")
    assert inside.sum() >= 10
    assert success.float().mean() >= 0.9


def _certified_survive(model, x, norm, bound):
    verifier = get_verifier("global-lipschitz", bound=bound)
    verifier.prepare(model, DIGITS_SHAPE)
    cert = verifier.certify(x, norm, [1e-3])
    keep = cert.radius > 0
    radius = cert.radius[keep].float()
    _, success = pgd(model, x[keep], cert.prediction[keep], radius, norm, steps=50, restarts=4)
    return int(keep.sum()), int(success.sum())


@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("bound", ["gloro", "lmt"])
def test_certified_points_of_trained_models_survive_pgd(trained, digits, norm, bound):
    x = digits.x_test[:120]
    total = 0
    for name, model in trained.items():
        certified, flipped = _certified_survive(model, x, norm, bound)
        assert flipped == 0, f"{name}: PGD flipped {flipped} certified points"
        total += certified
    assert total > 100  # the check ran on many certified points


@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("arch", sorted(RANDOM_MODELS))
def test_certified_points_of_random_models_survive_pgd(arch, norm):
    model = random_model(arch, seed=5, **RANDOM_MODELS[arch])
    x = torch.rand(60, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(4))
    certified, flipped = _certified_survive(model, x, norm, "gloro")
    assert flipped == 0
    assert certified > 0


def test_ties_and_zero_margins_are_never_certified():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 1.0, 0.0]))  # classes 0 and 1 tie everywhere
    verifier = get_verifier("global-lipschitz")
    verifier.prepare(model, DIGITS_SHAPE)
    cert = verifier.certify(torch.rand(5, *DIGITS_SHAPE), "2", [1e-9])
    assert (cert.radius == 0).all()
    assert (cert.verdicts == verdict_code(Verdict.NOT_CERTIFIED)).all()


def test_linf_radius_is_the_l2_radius_over_sqrt_d():
    model = random_model("mlp", widths=[16])
    verifier = get_verifier("global-lipschitz")
    verifier.prepare(model, DIGITS_SHAPE)
    x = torch.rand(10, *DIGITS_SHAPE)
    r2, rinf = verifier.certify(x, "2", [0.1]).radius, verifier.certify(x, "inf", [0.1]).radius
    torch.testing.assert_close(rinf, r2 / 8.0)


@pytest.mark.parametrize("layer", [nn.MaxPool2d(2, ceil_mode=True), nn.Softmax(dim=1), nn.GELU()])
def test_unsupported_layers_are_named_not_bounded(layer):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), layer, nn.Flatten(),
                          nn.LazyLinear(10))
    model(torch.zeros(1, *DIGITS_SHAPE))
    with pytest.raises(UnsupportedLayerError, match=type(layer).__name__):
        get_verifier("global-lipschitz").prepare(model.eval(), DIGITS_SHAPE)


def test_bound_is_cached_so_certification_is_one_forward_pass(trained):
    model = trained["mlp-gloro"]
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    verifier = get_verifier("global-lipschitz")
    verifier.prepare(model, DIGITS_SHAPE)
    calls.clear()
    verifier.certify(torch.rand(7, *DIGITS_SHAPE), "2", [0.1, 0.2])
    handle.remove()
    assert len(calls) == 1


class _ScaledSkip(nn.Module):
    def forward(self, x):
        return torch.add(x, x, alpha=3.0)


def test_arithmetic_with_keyword_arguments_is_refused():
    model = nn.Sequential(nn.Flatten(), _ScaledSkip(), nn.Linear(64, 10))
    with pytest.raises(UnsupportedLayerError, match="operation 'add'"):
        get_verifier("global-lipschitz").prepare(model.eval(), DIGITS_SHAPE)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = nn.Linear(64, 64)

    def forward(self, x):
        return x + self.branch(x)


def test_residual_connection_is_one_plus_the_branch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), _Residual(), nn.Linear(64, 10)).eval()
    bounds = LipschitzGraph(model, DIGITS_SHAPE).bounds()
    branch = torch.linalg.matrix_norm(model[1].branch.weight.double(), ord=2)
    last = torch.linalg.matrix_norm(model[2].weight.double(), ord=2)
    torch.testing.assert_close(bounds.penultimate, 1 + branch.detach())
    torch.testing.assert_close(bounds.network, (1 + branch.detach()) * last.detach())


class _TwoBranches(nn.Module):
    """cat(relu(conv(x)), tanh(conv(x))) along the channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)


class _DenseResidual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), nn.Sigmoid(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.branch(x)


def _graph_model(kind: str) -> nn.Module:
    torch.manual_seed(7)
    layers = {
        "sigmoid": [nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10)],
        "tanh": [nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 10)],
        "concat": [_TwoBranches(), nn.Flatten(), nn.Linear(5 * 64, 10)],
        "residual": [nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), _DenseResidual(32),
                     nn.Linear(32, 10)],
        "maxpool": [nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(3, 1, 1), nn.Flatten(),
                    nn.Linear(256, 10)],
    }[kind]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():  # weights large enough to reach the saturated and steep regions
        for param in model.parameters():
            param.mul_(3.0)
    return model


@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "concat", "residual", "maxpool"])
def test_bounds_dominate_sampled_jacobians_on_general_graphs(kind):
    model = _graph_model(kind)
    bounds = LipschitzGraph(model, DIGITS_SHAPE).bounds()
    k = bounds.pairwise()
    x = 2 * torch.randn(400, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        jac = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None])[0]))(x).flatten(2)
    assert torch.linalg.matrix_norm(jac, ord=2).max() <= bounds.network
    slopes = (jac[:, :, None] - jac[:, None, :]).norm(dim=-1).amax(0)  # (classes, classes)
    assert slopes.max() > 0
    assert (slopes <= k).all(), (slopes - k).max()


def test_sigmoid_rule_is_its_largest_slope():
    model = _graph_model("sigmoid")
    norms = [torch.linalg.matrix_norm(model[i].weight.double(), ord=2) for i in (1, 3)]
    bound = LipschitzGraph(model, DIGITS_SHAPE).bounds().network
    torch.testing.assert_close(bound, (norms[0] * norms[1] / 4).detach())


class _NoRule(Activation):
    def forward(self, x):
        return nn.functional.gelu(x)


def test_an_operation_without_a_lipschitz_rule_is_named(monkeypatch):
    """The walker asks every operation for its rule; one without a rule (here GELU traced
    as a made-up operation) is refused by name, with the layer it came from."""
    monkeypatch.setitem(traced_graph.MODULE_OPERATIONS, nn.GELU, _NoRule)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, 10))
    graph = LipschitzGraph(model.eval(), DIGITS_SHAPE)
    with pytest.raises(UnsupportedLayerError, match=r"no Lipschitz rule for _NoRule.*GELU"):
        graph.bounds()


@pytest.mark.parametrize("pool", [
    nn.AvgPool2d(3, ceil_mode=True), nn.AvgPool2d(2, divisor_override=1), nn.AdaptiveAvgPool2d(2),
])
def test_average_pools_without_a_sound_rule_are_refused(pool):
    model = nn.Sequential(pool, nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, *DIGITS_SHAPE))
    with pytest.raises(UnsupportedLayerError, match=type(pool).__name__):
        LipschitzGraph(model.eval(), DIGITS_SHAPE).bounds()


def test_grouped_and_same_padded_convolutions_are_refused():
    for conv in (nn.Conv2d(1, 2, 3, padding="same"), nn.Conv2d(2, 2, 3, groups=2)):
        first = [] if conv.in_channels == 1 else [nn.Conv2d(1, 2, 1)]
        model = nn.Sequential(*first, conv, nn.Flatten(), nn.LazyLinear(10))
        model(torch.zeros(1, *DIGITS_SHAPE))
        with pytest.raises(UnsupportedLayerError, match="Conv2d"):
            LipschitzGraph(model.eval(), DIGITS_SHAPE).bounds()


def test_max_pool_rule_covers_an_input_shared_by_every_window():
    """A spike that is the maximum of all 9 overlapping 3x3 windows around it: the
    Jacobian there has 9 equal rows, norm 3 = sqrt(ceil(3/1)^2), the rule's value."""
    model = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Flatten()).eval()
    x = torch.zeros(1, *DIGITS_SHAPE)
    x[0, 0, 4, 4] = 1.0
    jac = torch.autograd.functional.jacobian(lambda v: model(v)[0], x).flatten(1)
    bound = LipschitzGraph(model, DIGITS_SHAPE).bounds().network
    assert torch.linalg.matrix_norm(jac, ord=2) == pytest.approx(3.0)
    assert bound >= 3.0 - 1e-9
