"""MinMax (GroupSort of size 2) through every method that takes it: the layer against its
definition and its 1-Lipschitz claim; the operation's relaxation against sampled inputs
of one layer (sound everywhere, exact where no pair can reorder); the decomposition CROWN
and alpha-CROWN take (the same function, exact transposes, never looser); IBP, CROWN-IBP,
CROWN and alpha-CROWN bounds of a convolutional MinMax network against sampled and attacked
margins; the local constant against sampled gradients; the global bound against PGD;
the MILP against a dense grid and bab against the MILP (both take the decomposition)."""

from __future__ import annotations

import pytest
import torch
from test_bound_propagation import margins, sample_ball
from torch import nn

from certbench.models import build_model
from certbench.run.attacks import pgd
from certbench.verifiers import Verdict, get_verifier, verdict_code
from certbench.verifiers.bound_propagation import (
    Ball,
    BoundPropagator,
    TracedNetwork,
    margin_spec,
)
from certbench.verifiers.bound_propagation.operators import MinMax as MinMaxOperation
from certbench.verifiers.bound_propagation.patches import Patches
from certbench.verifiers.layers import MinMax

SHAPE = (1, 8, 8)
CERTIFIED, FALSIFIED = verdict_code(Verdict.CERTIFIED), verdict_code(Verdict.FALSIFIED)


def minmax_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), MinMax(), nn.Conv2d(4, 4, 4, stride=2, padding=1),
        MinMax(), nn.Flatten(), nn.Linear(64, 16), MinMax(), nn.Linear(16, 5),
    ).eval()


def test_the_layer_sorts_each_channel_pair_and_is_one_lipschitz():
    x = torch.randn(64, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    y = MinMax()(x)
    for k in range(3):  # channel k is paired with channel k + 3
        torch.testing.assert_close(y[:, k], torch.minimum(x[:, k], x[:, k + 3]))
        torch.testing.assert_close(y[:, k + 3], torch.maximum(x[:, k], x[:, k + 3]))
    z = x + 0.3 * torch.randn_like(x)
    assert ((MinMax()(z) - y).flatten(1).norm(dim=1) <= (z - x).flatten(1).norm(dim=1)
            + 1e-6).all()
    with pytest.raises(ValueError, match="even"):
        MinMax()(torch.zeros(1, 3))


@pytest.mark.parametrize("spread", [0.05, 1.0])
def test_the_relaxation_lies_below_every_sampled_output(spread):
    """sum(a * minmax(z)) >= a' . z + const for z sampled in the box, rows of both signs;
    with narrow boxes (most pairs cannot reorder) the bound is attained at some z."""
    gen = torch.Generator().manual_seed(1)
    centre = torch.randn(3, 8, generator=gen)
    lower = centre - spread * torch.rand(3, 8, generator=gen)
    upper = centre + spread * torch.rand(3, 8, generator=gen)
    a = torch.randn(3, 4, 8, generator=gen)
    op = MinMaxOperation()
    a_in, const = op.relaxed_backward(a, lower, upper)
    z = lower + (upper - lower) * torch.rand(4000, 3, 8, generator=gen)
    z[:2000] = torch.where(torch.rand(2000, 3, 8, generator=gen) < 0.5, lower, upper)
    exact = torch.einsum("brk,nbk->nbr", a, op.forward(z.flatten(0, 1)).view_as(z))
    relaxed = torch.einsum("brk,nbk->nbr", a_in, z) + const
    assert (relaxed <= exact + 1e-5).all()
    stable = ~op.inexact(lower, upper).any(1)
    gap = (exact - relaxed).amin(0)[stable]
    assert stable.any() == (spread < 0.1)
    assert (gap < 1e-5).all()


@pytest.mark.parametrize("norm,eps", [("inf", 0.03), ("2", 0.3)])
def test_bounds_of_a_minmax_network_contain_sampled_and_attacked_margins(norm, eps):
    model = minmax_net(seed=2)
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(3))
    prediction = model(x).argmax(1)
    spec = margin_spec(prediction, 5).detach()
    observed = torch.stack([margins(model, p, spec)
                            for p in sample_ball(x, eps, norm, 300, seed=4)]).amin(0)
    attacked, _ = pgd(model, x, prediction, eps, norm, steps=50, restarts=3)
    observed = torch.minimum(observed, margins(model, attacked, spec))
    bounds = {}
    for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        verifier = get_verifier(method)
        verifier.prepare(model, SHAPE)
        with torch.no_grad():
            bounds[method] = verifier.margin_lower_bounds(x, spec, eps, norm)
        assert (bounds[method] <= observed + 1e-5).all(), method
    assert (bounds["crown"] >= bounds["ibp"] - 1e-5).float().mean() > 0.5  # mostly tighter


@pytest.mark.parametrize("norm,eps", [("inf", 0.03), ("2", 0.3)])
def test_windows_through_minmax_give_the_bounds_of_dense_coefficients(norm, eps, monkeypatch):
    """MinMax takes its rows as windows (a pair is two channels of one pixel, so a window
    holds both members): the convolutional MinMax layer meets windows, and CROWN's and
    alpha-CROWN's margin bounds equal those of dense coefficients."""
    model = minmax_net(seed=7)
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(8))
    spec = margin_spec(model(x).argmax(1), 5).detach()
    prop = BoundPropagator(TracedNetwork(model, SHAPE))
    ball = Ball(x, eps, norm)
    bounds = prop.intermediate_bounds(ball, "crown")
    first_minmax = prop.activations[0]
    assert first_minmax in prop.window_placements(prop.relu_inputs[1], ball, bounds)
    parts = BoundPropagator(TracedNetwork(model, SHAPE).decomposed())  # CROWN's graph
    bounds = parts.intermediate_bounds(ball, "crown")
    first_relu = parts.activations[0]
    assert first_relu in parts.window_placements(parts.relu_inputs[1], ball, bounds)
    for method in ("crown", "alpha-crown"):
        verifier = get_verifier(method)
        verifier.prepare(model, SHAPE)
        with torch.no_grad():
            got = verifier.margin_lower_bounds(x, spec, eps, norm)
            with monkeypatch.context() as dense:
                dense.setattr(Patches, "worth_keeping", lambda self: False)
                verifier.prepare(model, SHAPE)  # alpha's window placements are kept
                expected = verifier.margin_lower_bounds(x, spec, eps, norm)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_decomposition_computes_the_layer_and_its_parts_transpose_exactly():
    """The decomposed network (d = a - b, r = relu(d), y = (a - r, b + r)) equals the
    model; each new linear part's backward is its transpose, for dense rows and windows."""
    model = minmax_net(seed=9)
    network = TracedNetwork(model, SHAPE).decomposed()
    kinds = [type(node.op).__name__ for node in network.nodes[1:]]
    assert kinds.count("PairDifference") == kinds.count("PairMerge") == 3
    assert "MinMax" not in kinds
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(10))
    values = [x]
    for node in network.nodes[1:]:
        values.append(node.op.forward(*[values[j] for j in node.inputs]))
    torch.testing.assert_close(values[network.output], model(x))
    gen = torch.Generator().manual_seed(11)
    for node in network.nodes[1:]:
        if type(node.op).__name__ not in ("PairDifference", "PairMerge"):
            continue
        inputs = [torch.randn(2, *network.nodes[j].shape, generator=gen) for j in node.inputs]
        a = torch.randn(2, 3, *node.shape, generator=gen)
        (dense, _) = node.op.backward(a)
        out = (a * node.op.forward(*inputs).unsqueeze(1)).flatten(2).sum(-1)
        through = sum((c * z.unsqueeze(1)).flatten(2).sum(-1)
                      for c, z in zip(dense, inputs, strict=True))
        torch.testing.assert_close(through, out, rtol=1e-5, atol=1e-5)
        if len(node.shape) == 3:  # the same rows as windows
            windows = Patches(a[..., 1:3, 2:5], torch.full((2, 3), 1), torch.full((2, 3), 2),
                              node.shape)
            a_windows = windows.to_dense()
            (as_windows, _), (expected, _) = (node.op.backward(windows),
                                             node.op.backward(a_windows))
            for got, want in zip(as_windows, expected, strict=True):
                torch.testing.assert_close(got.to_dense(), want)


@pytest.mark.parametrize("norm,eps", [("inf", 0.03), ("2", 0.3)])
def test_crown_on_the_decomposition_is_never_looser_than_the_whole_operation(norm, eps):
    """CROWN bounds each pair's difference itself where the whole operation subtracts two
    boxes: on the same network its margin bounds are at least as tight, and tighter on
    average; alpha-CROWN frees r's slopes and is at least as tight again. (Soundness
    against samples and PGD: the test above, whose verifiers take the decomposition.)"""
    model = minmax_net(seed=2)
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(3))
    spec = margin_spec(model(x).argmax(1), 5).detach()
    ball = Ball(x, eps, norm)
    network = TracedNetwork(model, SHAPE)
    with torch.no_grad():
        whole = BoundPropagator(network).lower_bound(spec, ball, "crown")
        parts = BoundPropagator(network.decomposed()).lower_bound(spec, ball, "crown")
        alpha = BoundPropagator(network.decomposed()).lower_bound(spec, ball, "alpha-crown")
    assert (parts >= whole - 1e-5).all()
    assert (parts - whole).mean() > 1e-3
    assert (alpha >= parts - 1e-5).all()
    crown = get_verifier("crown")
    crown.prepare(model, SHAPE)
    torch.testing.assert_close(crown.margin_lower_bounds(x, spec, eps, norm), parts)


def test_crown_is_exact_where_no_pair_can_reorder():
    """A tiny l_inf ball: every pair keeps its order, the network is affine on the ball,
    and CROWN's bound is the affine margin's minimum, c . x - eps ||c||_1."""
    model = minmax_net(seed=5)
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(6))
    spec = margin_spec(model(x).argmax(1), 5).detach()
    eps = 1e-4
    verifier = get_verifier("crown")
    verifier.prepare(model, SHAPE)
    bound = verifier.margin_lower_bounds(x, spec, eps, "inf")
    z = x.clone().requires_grad_(True)
    values = (spec @ model(z).unsqueeze(-1)).squeeze(-1)
    for row in range(spec.shape[1]):
        (grad,) = torch.autograd.grad(values[:, row].sum(), z, retain_graph=True)
        exact = values[:, row].detach() - eps * grad.abs().flatten(1).sum(1)
        torch.testing.assert_close(bound[:, row], exact, atol=2e-5, rtol=0)


def test_the_local_constant_bounds_sampled_gradients():
    model = minmax_net(seed=7)
    verifier = get_verifier("local-lipschitz")
    verifier.prepare(model, SHAPE)
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(8))
    eps = 0.05
    spec = margin_spec(model(x).argmax(1), 5).detach()
    constants = verifier.local_constants(x, spec, eps, "inf")
    points = sample_ball(x, eps, "inf", 200, seed=9).requires_grad_(True)
    values = (spec @ model(points.flatten(0, 1)).reshape(200, 4, 5, 1)).squeeze(-1)
    for row in range(spec.shape[1]):
        (grad,) = torch.autograd.grad(values[..., row].sum(), points, retain_graph=True)
        assert (grad.abs().flatten(2).sum(-1).amax(0) <= constants[:, row] + 1e-6).all()
    # a tiny ball, where no pair can reorder: the constant is the gradient's own norm
    tight = verifier.local_constants(x, spec, 1e-5, "inf")
    z = x.clone().requires_grad_(True)
    values = (spec @ model(z).unsqueeze(-1)).squeeze(-1)
    for row in range(spec.shape[1]):
        (grad,) = torch.autograd.grad(values[:, row].sum(), z, retain_graph=True)
        torch.testing.assert_close(tight[:, row].float(), grad.abs().flatten(1).sum(1), rtol=1e-3,
                                   atol=1e-5)


def test_gradient_bounds_take_the_hull_even_when_lower_and_upper_are_one_tensor():
    """The local-Lipschitz pass starts from (spec, spec): one tensor for both ends. A pair
    that can reorder sends each member the hull of the two gradients, whatever aliasing."""
    g = torch.tensor([[[1.0, 0.0]]])  # (batch, rows, 2): gradient 1 on min, 0 on max
    z_lower, z_upper = torch.full((1, 1, 2), -1.0), torch.full((1, 1, 2), 1.0)
    lower, upper = MinMaxOperation().gradient_bounds(g, g, z_lower, z_upper)
    assert torch.equal(lower, torch.zeros(1, 1, 2)) and torch.equal(upper, torch.ones(1, 1, 2))
    ordered_lower, ordered_upper = MinMaxOperation().gradient_bounds(
        g, g, torch.tensor([[[-2.0, 1.0]]]), torch.tensor([[[-1.0, 2.0]]]))  # a <= b
    assert torch.equal(ordered_lower, g) and torch.equal(ordered_upper, g)


def test_the_global_bound_lies_above_sampled_margin_gradients():
    """||grad (f_i - f_j)||_2 <= K_ij at random inputs; MinMax keeps gradient norms, so a
    constant under 1 for it (compounded over six layers) would show here."""
    from certbench.verifiers.global_lipschitz import LipschitzGraph

    model = build_model("cnn-4c3f", (1, 28, 28), 10, [0.1307], [0.3081],
                        {"activation": "minmax", "init": "orthogonal",
                         "channels": (4, 4, 8, 8), "dense": (16, 16)}).eval()
    k = LipschitzGraph(model, (1, 28, 28)).bounds(torch.float32).pairwise()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(11))
    x.requires_grad_(True)
    logits = model(x)
    worst = torch.zeros(10, 10)
    for i in range(10):
        for j in range(i + 1, 10):
            (grad,) = torch.autograd.grad((logits[:, i] - logits[:, j]).sum(), x,
                                          retain_graph=True)
            worst[i, j] = grad.flatten(1).norm(dim=1).max()
    upper = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    assert (worst[upper] <= k.detach()[upper] * (1 + 1e-5)).all()
    assert (worst[upper] / k.detach()[upper]).max() > 1 / 32  # not vacuous


def test_no_pgd_point_inside_a_global_lipschitz_radius_flips_the_prediction():
    model = build_model("cnn-4c3f", (1, 28, 28), 10, [0.1307], [0.3081],
                        {"activation": "minmax", "init": "orthogonal",
                         "channels": (4, 4, 8, 8), "dense": (16, 16)}).eval()
    verifier = get_verifier("global-lipschitz")
    verifier.prepare(model, (1, 28, 28))
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(10))
    radius = verifier.certify(x, "2", [0.01]).radius.float()
    assert (radius > 0).any()
    found, success = pgd(model, x, model(x).argmax(1), radius * 0.999, "2", steps=100,
                         restarts=3)
    assert not success[radius > 0].any()


def test_the_milp_decides_a_minmax_network_as_a_dense_grid_does():
    """The MILP encodes MinMax's decomposition (r = relu(a - b) takes one binary): on a
    two-input network its verdict at each epsilon is the grid's, both outcomes seen."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 12), MinMax(), nn.Linear(12, 12), MinMax(),
                          nn.Linear(12, 3)).eval()
    x = torch.tensor([[0.5, 0.4]])
    verifier = get_verifier("exact")
    verifier.prepare(model, (2,))
    grid_eps = [0.05, 0.1, 0.2, 0.3, 0.4]  # grid minima 0.20, 0.16, 0.07, -0.02, -0.12
    cert = verifier.certify(x, "inf", grid_eps)
    y = int(cert.prediction[0])
    seen = set()
    for k, eps in enumerate(grid_eps):
        axes = [torch.linspace(max(0, c - eps), min(1, c + eps), 401) for c in x[0].tolist()]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
        with torch.no_grad():
            out = model(grid)
        margin = out[:, y:y + 1] - out
        margin[:, y] = float("inf")
        expected = CERTIFIED if margin.min() > 0 else FALSIFIED
        assert cert.verdicts[0, k] == expected, eps
        seen.add(expected)
    assert seen == {CERTIFIED, FALSIFIED}


def test_bab_agrees_with_the_milp_on_a_minmax_network():
    """Branch and bound splits MinMax's ReLU r = relu(a - b): complete, so its verdicts are
    the MILP's, both outcomes seen; every counterexample flips the prediction inside the
    ball."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), MinMax(), nn.Linear(16, 16),
                          MinMax(), nn.Linear(16, 10)).eval()
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(5))
    eps = [0.002, 0.01, 0.03]
    exact = get_verifier("exact", time_limit_s=60)
    exact.prepare(model, SHAPE)
    truth = exact.certify(x, "inf", eps)
    bab = get_verifier("bab", time_limit_s=60)
    bab.prepare(model, SHAPE)
    cert = bab.certify(x, "inf", eps)
    assert (truth.verdicts == CERTIFIED).any() and (truth.verdicts == FALSIFIED).any()
    assert torch.equal(cert.verdicts, truth.verdicts)
    assert cert.counterexamples
    for (n, k), point in cert.counterexamples.items():
        assert (point - x[n]).abs().max() <= eps[k] * (1 + 1e-5) + 1e-6
        with torch.no_grad():
            assert model(point).argmax(1) != model(x[n : n + 1]).argmax(1)
