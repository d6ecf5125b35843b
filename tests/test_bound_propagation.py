"""Soundness and behaviour of the bound-propagation engine (IBP, CROWN, CROWN-IBP,
alpha-CROWN): bounds contain every output that sampling and PGD find in the ball, exact
answers on linear networks, alpha-CROWN never looser than CROWN, clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certbench.models import build_model
from certbench.run.attacks import pgd
from certbench.verifiers import UnsupportedLayerError, Verdict, get_verifier, verdict_code
from certbench.verifiers.bound_propagation import (
    Ball,
    BoundPropagator,
    TracedNetwork,
    margin_spec,
)
from certbench.verifiers.bound_propagation.operators import (
    Elementwise,
    Operation,
    Sum,
    unstable_rows,
)
from certbench.verifiers.bound_propagation.patches import Patches
from conftest import DIGITS_SHAPE, RANDOM_MODELS, random_model

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]
ARCHS = {
    "mlp": {"widths": [32, 32]},
    "cnn-small": {"width": 2, "linear_size": 32},
    "resnet-tiny": {"channels": 4, "blocks": 1, "hidden": 16, "batchnorm": True},
}
EPS = {"inf": 0.02, "2": 0.15}


def sample_ball(x: torch.Tensor, eps: float, norm: str, count: int, seed: int) -> torch.Tensor:
    """``count`` points of the ball around each x, clipped to [0, 1] (clipping toward
    x keeps a point inside the ball), half of them on the sphere/box corners."""
    gen = torch.Generator().manual_seed(seed)
    shape = (count, *x.shape)
    if norm == "inf":
        delta = (2 * torch.rand(shape, generator=gen) - 1) * eps
        delta[: count // 2] = delta[: count // 2].sign() * eps
    else:
        direction = torch.randn(shape, generator=gen)
        direction /= direction.flatten(2).norm(dim=2)[..., None, None, None]
        radius = torch.rand(count, len(x), 1, 1, 1, generator=gen)
        radius[: count // 2] = 1.0
        delta = direction * radius * eps
    return (x[None] + delta).clamp(0, 1)


def margins(model, points, spec):
    with torch.no_grad():
        return (spec @ model(points).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bounds_contain_sampled_and_attacked_outputs(arch, norm):
    model = random_model(arch, seed=7, **ARCHS[arch])
    x = torch.rand(8, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(3))
    eps = EPS[norm]
    with torch.no_grad():
        prediction = model(x).argmax(1)
    spec = margin_spec(prediction, 10)
    propagator = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    bounds = {m: propagator.lower_bound(spec, Ball(x, eps, norm), m) for m in METHODS}
    points = sample_ball(x, eps, norm, 300, seed=1)
    observed = torch.stack([margins(model, p, spec) for p in points]).amin(0)
    attacked, _ = pgd(model, x, prediction, eps, norm, steps=50, restarts=3)
    observed = torch.minimum(observed, margins(model, attacked, spec))
    for method, lb in bounds.items():
        assert (lb <= observed + 1e-5).all(), f"{method} bound above an observed margin"
    # alpha-CROWN starts from CROWN's slopes and keeps the best: never looser
    assert (bounds["alpha-crown"] >= bounds["crown"] - 1e-6).all()
    # the bounds are informative, not -inf: CROWN is within reach of the observed minimum
    assert (observed - bounds["crown"]).mean() < 10 * observed.abs().mean() + 1


@pytest.mark.parametrize("method", METHODS)
def test_exact_on_a_network_without_relus(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.Linear(20, 10)).eval()
    x = torch.rand(5, *DIGITS_SHAPE)
    with torch.no_grad():
        prediction = model(x).argmax(1)
    spec = margin_spec(prediction, 10)
    propagator = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    w = model[2].weight @ model[1].weight  # the network is x -> W x + b
    a = spec @ w  # (batch, rows, 64)
    center = (spec @ model(x).unsqueeze(-1)).squeeze(-1)
    lo, hi = (x - 0.05).clamp(0, 1).flatten(1), (x + 0.05).clamp(0, 1).flatten(1)
    exact = center + torch.einsum("brd,bd->br", a.clamp(max=0), hi - x.flatten(1)) + \
        torch.einsum("brd,bd->br", a.clamp(min=0), lo - x.flatten(1))
    lb = propagator.lower_bound(spec, Ball(x, 0.05, "inf"), method)
    if method == "ibp":  # IBP loses correlations across the two layers
        assert (lb <= exact + 1e-5).all()
    else:
        torch.testing.assert_close(lb, exact.detach(), rtol=1e-5, atol=1e-5)


def test_chunked_intermediate_bounds_equal_unchunked():
    model = random_model("cnn-small", seed=2, **ARCHS["cnn-small"])
    x = torch.rand(3, *DIGITS_SHAPE)
    spec = margin_spec(model(x).argmax(1), 10)
    net = TracedNetwork(model, DIGITS_SHAPE)
    whole = BoundPropagator(net).lower_bound(spec, Ball(x, 0.01, "inf"), "crown")
    chunked = BoundPropagator(net, memory_budget_bytes=20_000).lower_bound(
        spec, Ball(x, 0.01, "inf"), "crown"
    )
    torch.testing.assert_close(whole, chunked)


def test_l2_ball_is_intersected_with_the_box():
    """A ball much larger than the box: the box bound is the tighter one, and the ball
    intersected with the box uses it (max of the two sound lower bounds)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.full((2, *DIGITS_SHAPE), 0.5)
    spec = margin_spec(model(x).argmax(1), 10)
    propagator = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    clipped = propagator.lower_bound(spec, Ball(x, 5.0, "2", clip=True), "crown")
    plain = propagator.lower_bound(spec, Ball(x, 5.0, "2", clip=False), "crown")
    assert (clipped >= plain).all() and (clipped > plain + 1e-4).any()


@pytest.mark.parametrize("method", METHODS)
def test_certified_points_of_trained_models_survive_pgd(trained, digits, method):
    x = digits.x_test[:60]
    total = 0
    for name in ("mlp-standard", "mlp-gloro", "cnn-small-gloro"):
        model = trained[name]
        verifier = get_verifier(method, radius=True, radius_max=0.2, radius_tol=2e-3)
        verifier.prepare(model, DIGITS_SHAPE)
        cert = verifier.certify(x, "inf", [0.01])
        keep = cert.radius > 0
        _, success = pgd(model, x[keep], cert.prediction[keep], cert.radius[keep].float(), "inf",
                         steps=50, restarts=3)
        assert not success.any(), f"{name}: PGD flipped a point certified by {method}"
        total += int(keep.sum())
    assert total > 50


def test_radius_is_certified_and_nearly_maximal(trained, digits):
    model = trained["mlp-gloro"]
    verifier = get_verifier("crown", radius=True, radius_max=0.5, radius_tol=1e-3)
    verifier.prepare(model, DIGITS_SHAPE)
    x = digits.x_test[:20]
    cert = verifier.certify(x, "inf", [0.01])
    spec = margin_spec(cert.prediction, 10)
    slack = 1e-5 * (1 + model(x).abs().amax(1))
    at = verifier.margin_lower_bounds(x, spec, cert.radius.float(), "inf").min(1).values
    above = verifier.margin_lower_bounds(x, spec, cert.radius.float() + 2e-3, "inf")
    positive = cert.radius > 0
    assert (at[positive] > slack[positive]).all()
    assert (above.min(1).values[positive] <= slack[positive]).all()


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_margin_bounds_keep_no_autograd_graph(method):
    """Called with autograd on, the verifier's bounds record no graph through the weights
    (kept alive over every chunk, it took 24 GB on a small CIFAR ResNet)."""
    model = random_model("cnn-small", seed=2, **ARCHS["cnn-small"])
    x = torch.rand(2, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(1))
    spec = margin_spec(model(x).argmax(1), 10).detach()
    verifier = get_verifier(method, alpha_iterations=2) if method == "alpha-crown" \
        else get_verifier(method)
    verifier.prepare(model, DIGITS_SHAPE)
    lower = verifier.margin_lower_bounds(x, spec, 0.02, "inf")
    assert lower.grad_fn is None and not lower.requires_grad


def test_time_budget_exhausted_is_timeout_not_failure(trained, digits):
    verifier = get_verifier("crown", time_budget_s=0.0)
    verifier.prepare(trained["mlp-gloro"], DIGITS_SHAPE)
    cert = verifier.certify(digits.x_test[:5], "inf", [0.01, 0.02])
    assert (cert.verdicts == verdict_code(Verdict.TIMEOUT)).all()


@pytest.mark.parametrize(
    "layer,name",
    [(nn.Softmax(dim=1), "Softmax"), (nn.MaxPool2d(2, ceil_mode=True), "MaxPool2d"),
     (nn.GELU(), "GELU")],
)
def test_unsupported_layer_is_named(layer, name):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), layer, nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, *DIGITS_SHAPE))
    with pytest.raises(UnsupportedLayerError, match=name):
        get_verifier("crown").prepare(model.eval(), DIGITS_SHAPE)


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 10, batch_first=True)

    def forward(self, x):
        return self.lstm(x.flatten(1, 2))[0][:, -1]


def test_lstm_is_refused():
    with pytest.raises(UnsupportedLayerError, match="LSTM|lstm"):
        get_verifier("ibp").prepare(_Recurrent().eval(), DIGITS_SHAPE)


@pytest.mark.parametrize("arch", sorted(RANDOM_MODELS))
def test_l2_first_layer_shortcut_equals_the_backward_pass(arch):
    model = random_model(arch, **RANDOM_MODELS[arch])
    propagator = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    x = torch.rand(5, *DIGITS_SHAPE)
    ball = Ball(x, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), "2", clip=False)
    checked = 0
    for i in propagator.relu_inputs:
        if i in propagator.affine:
            fast = propagator._l2_first_layer(i, ball)
            slow = propagator.node_bounds(i, ball, {})
            assert torch.allclose(fast[0], slow[0], atol=1e-5)
            assert torch.allclose(fast[1], slow[1], atol=1e-5)
            checked += 1
    assert checked == 1


def test_alpha_crown_in_sample_chunks_equals_one_batch():
    """Slopes are per sample and the loss a sum over samples: optimising the batch in
    chunks (a small memory budget) gives the same bounds as in one piece."""
    model = random_model("cnn-small", seed=5, **ARCHS["cnn-small"])
    x = torch.rand(6, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(1))
    spec = margin_spec(model(x).argmax(1), 10)
    net = TracedNetwork(model, DIGITS_SHAPE)
    ball = Ball(x, 0.03, "inf")
    small = BoundPropagator(net, memory_budget_bytes=20_000)
    assert len(small._alpha_chunks(small.intermediate_bounds(ball, "crown"), 9, ball)) > 1
    with torch.no_grad():
        whole = BoundPropagator(net).lower_bound(spec, ball, "alpha-crown", alpha_iterations=5)
        chunked = small.lower_bound(spec, ball, "alpha-crown", alpha_iterations=5)
    torch.testing.assert_close(whole, chunked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["cnn-small", "cnn-4c3f", "resnet-tiny"])
def test_slopes_kept_per_window_give_the_bounds_of_slopes_on_the_whole_map(arch, monkeypatch):
    """alpha-CROWN keeps an intermediate row's slopes only where its window reaches
    (`window_placements`): random slopes on the whole feature map with dense
    coefficients everywhere (no windows), the same slopes read at each row's window, and
    the whole map's slopes with windows give the same bounds of every unstable neuron."""
    shape = (1, 16, 16)  # on 8 x 8 digits the windows soon cover the whole map
    torch.manual_seed(11)
    model = build_model(arch, shape, 10, (0.3,), (0.4,), RANDOM_MODELS[arch]).eval()
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(5))
    prop = BoundPropagator(TracedNetwork(model, shape))
    ball = Ball(x, 0.05, "inf")
    bounds = prop.intermediate_bounds(ball, "crown")
    gen = torch.Generator().manual_seed(6)
    windowed = 0
    for target in prop.relu_inputs:
        index, _ = unstable_rows(prop.activation_of[target].inexact(*bounds[target]))
        placements = prop.window_placements(target, ball, bounds)
        whole, per_window = {}, {}
        for a in prop.activations:
            if a >= target:
                break
            whole[a] = torch.rand(3, 2 * index.shape[1], *prop.net.nodes[a].shape,
                                  generator=gen)
            per_window[a] = whole[a]
            if a in placements:
                rows = placements[a].select(torch.cat([index, index], 1))
                per_window[a] = rows.gather(whole[a])
                windowed += 1
        got = prop.neuron_bounds(target, index, ball, bounds, _by_sign(per_window))
        got_from_whole = prop.neuron_bounds(target, index, ball, bounds, _by_sign(whole))
        with monkeypatch.context() as dense:
            dense.setattr(Patches, "worth_keeping", lambda self: False)
            expected = prop.neuron_bounds(target, index, ball, bounds, _by_sign(whole))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_from_whole, expected, rtol=1e-5, atol=1e-5)
    assert windowed  # some rows met windows: the test compares something


def test_rows_of_batchnorm_after_a_conv_are_windows_with_the_bounds_of_dense_rows(monkeypatch):
    """A BatchNorm node's rows are 1 x 1 windows (`Elementwise.backward_rows`), so that the
    convolution below it takes them as patches; CROWN's bounds of every unstable neuron
    equal those of dense one-hot rows (BatchNorm with random statistics, some scales
    negative, shifts non-zero)."""
    model = random_model("resnet-tiny", seed=4, **ARCHS["resnet-tiny"])
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data[::2] *= -1
    prop = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    x = torch.rand(3, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(8))
    ball = Ball(x, 0.03, "inf")
    bounds = prop.intermediate_bounds(ball, "crown")
    targets = [t for t in prop.relu_inputs if isinstance(prop.net.nodes[t].op, Elementwise)]
    assert targets  # the network has BatchNorm before a ReLU
    for target in targets:
        node = prop.net.nodes[target]
        index, _ = unstable_rows(prop.activation_of[target].inexact(*bounds[target]))
        assert index.shape[1]
        rows, const = node.op.backward_rows(index, node.shape, x.dtype)
        assert isinstance(rows[0], Patches) and rows[0].window == (1, 1)
        assert torch.is_tensor(const) and const.abs().sum() > 0
        got = prop.neuron_bounds(target, index, ball, bounds)
        with monkeypatch.context() as dense:
            dense.setattr(Elementwise, "backward_rows", Operation.backward_rows)
            expected = prop.neuron_bounds(target, index, ball, bounds)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_joined_windows_mean_the_sum_of_the_dense_rows():
    """`Patches.join` (residual joins): the windows of a + b scatter to a's dense rows plus
    b's, for windows of different sizes at one offset in every row, corners inside and
    outside the map; rows whose corners sit at different offsets do not join."""
    gen = torch.Generator().manual_seed(3)
    shape = (2, 9, 9)

    def windows(top, left, h, w):
        p = Patches(torch.randn(2, 5, 2, h, w, generator=gen), top, left, shape)
        return p.with_values(p.values * p.inside())  # zero outside the map (the invariant)

    top = torch.randint(-2, 8, (2, 5), generator=gen)
    left = torch.randint(-2, 8, (2, 5), generator=gen)
    a = windows(top, left, 3, 3)
    for dt, dl, h, w in [(-1, 2, 5, 4), (0, 0, 3, 3), (1, -2, 1, 1), (-2, -2, 7, 7)]:
        b = windows(top + dt, left + dl, h, w)
        joined = a.join(b)
        assert joined is not None
        torch.testing.assert_close(joined.to_dense(), a.to_dense() + b.to_dense())
        assert (joined.values * ~joined.inside() == 0).all()  # zero outside the map
        assert joined.window[0] <= max(3, h) + abs(dt) and joined.window[1] <= max(3, w) + abs(dl)
    shifted = windows(top + torch.arange(5), left, 3, 3)  # per-row offsets
    assert a.join(shifted) is None
    assert a.join(windows(top - 4, left - 4, 9, 9)) is None  # the join covers the map


def test_residual_joins_keep_windows_with_the_bounds_of_dense_rows(monkeypatch):
    """A residual block's Sum node starts its rows as 1 x 1 windows on both branches and
    the branches' windows join at the block's input (`Patches.join`), so the activation
    before the block meets windows; CROWN's bounds of every unstable neuron of every
    activation input equal those of dense coefficients throughout."""
    shape = (1, 16, 16)
    model = build_model("resnet-tiny", shape, 10, (0.3,), (0.4,),
                        ARCHS["resnet-tiny"] | {"channels": 2}).eval()
    prop = BoundPropagator(TracedNetwork(model, shape))
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(8))
    ball = Ball(x, 0.02, "inf")
    bounds = prop.intermediate_bounds(ball, "crown")
    joins = [t for t in prop.relu_inputs if len(prop.net.nodes[t].inputs) == 2]
    assert joins  # the block's output ReLU reads the residual Sum
    for target in joins:
        before = [a for a in prop.activations if a < target]
        assert set(before) <= set(prop.window_placements(target, ball, bounds))
    for target in prop.relu_inputs:
        index, _ = unstable_rows(prop.activation_of[target].inexact(*bounds[target]))
        got = prop.neuron_bounds(target, index, ball, bounds)
        with monkeypatch.context() as dense:
            dense.setattr(Patches, "worth_keeping", lambda self: False)
            dense.setattr(Elementwise, "backward_rows", Operation.backward_rows)
            dense.setattr(Sum, "backward_rows", Operation.backward_rows)
            expected = prop.neuron_bounds(target, index, ball, bounds)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _StridedDifferenceBlock(nn.Module):
    """relu(s(h) - branch(h)) with a strided 3 x 3 branch and a strided 1 x 1 shortcut s:
    the corners of the two branches' windows sit at a fixed offset (3 rows and columns)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(),
                                    nn.Conv2d(3, 3, 3, padding=1))
        self.shortcut = nn.Conv2d(2, 3, 1, stride=2)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 10))

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.shortcut(h) - self.branch(h))


def test_a_strided_difference_block_keeps_windows_with_the_bounds_of_dense_rows(monkeypatch):
    """A residual difference with a strided convolution on each branch: its rows join
    as windows before the block (`Patches.join`), and CROWN's and alpha-CROWN's margin
    bounds equal those of dense coefficients."""
    shape = (1, 16, 16)
    torch.manual_seed(2)
    model = _StridedDifferenceBlock().eval()
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(4))
    spec = margin_spec(model(x).argmax(1), 10).detach()
    prop = BoundPropagator(TracedNetwork(model, shape))
    ball = Ball(x, 0.02, "inf")
    bounds = prop.intermediate_bounds(ball, "crown")
    join = next(t for t in prop.relu_inputs if len(prop.net.nodes[t].inputs) == 2)
    assert prop.activations[0] in prop.window_placements(join, ball, bounds)
    for method in ("crown", "alpha-crown"):
        bounds = {}
        for windows in (True, False):  # a fresh verifier each: placements are kept
            verifier = get_verifier(method)
            verifier.prepare(model, shape)
            with torch.no_grad(), monkeypatch.context() as patched:
                if not windows:
                    patched.setattr(Patches, "worth_keeping", lambda self: False)
                    patched.setattr(Sum, "backward_rows", Operation.backward_rows)
                bounds[windows] = verifier.margin_lower_bounds(x, spec, 0.02, "inf")
        torch.testing.assert_close(bounds[True], bounds[False], rtol=1e-4, atol=1e-4)


def test_a_broadcasting_addition_is_refused():
    """Sum's rules take both inputs at the output's shape: h + y with y of shape
    (C, 1, 1) is refused by name, not bounded as if y were a feature map."""

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 8)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            return torch.relu(h + self.pool(h)).flatten(1)

    with pytest.raises(UnsupportedLayerError, match="broadcasting addition"):
        TracedNetwork(Broadcast(), DIGITS_SHAPE)


def _by_sign(alphas):
    """(batch, 2R, ...) slopes as `neuron_bounds` takes them: (batch, 2, R, ...)."""
    return {a: t.reshape(t.shape[0], 2, t.shape[1] // 2, *t.shape[2:]) for a, t in alphas.items()}


@pytest.mark.parametrize("arch", ["mlp", "cnn-small"])
def test_kept_relaxations_give_the_bounds_of_fresh_ones(arch):
    """Passes that share a ``relaxations`` dict (same bounds, slopes changing between
    passes, as in beta-CROWN's steps) give exactly the bounds of passes without it."""
    model = random_model(arch, seed=3, **ARCHS[arch])
    x = torch.rand(4, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(2))
    spec = margin_spec(model(x).argmax(1), 10)
    prop = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    ball = Ball(x, 0.03, "inf")
    bounds = prop.intermediate_bounds(ball, "crown")
    shapes = {a: prop.net.nodes[a].shape for a in prop.activations}
    gen = torch.Generator().manual_seed(4)
    relaxations: dict = {}
    for _ in range(3):
        alphas = {a: torch.rand(4, 9, *shape, generator=gen) for a, shape in shapes.items()}
        kept = prop.backward(prop.net.output, spec, ball, bounds, alphas,
                             relaxations=relaxations)
        fresh = prop.backward(prop.net.output, spec, ball, bounds, alphas)
        torch.testing.assert_close(kept, fresh, rtol=0, atol=0)
    assert set(relaxations) == set(prop.activations)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_slope_gradients_equal_one_sided_differences(arch):
    """The gradient alpha-CROWN follows is the bound's derivative. At CROWN's slopes
    (0 or 1) the bound is differentiated into [0, 1]: autograd's gradient along a
    direction that stays in the box equals the one-sided difference quotient (float64).
    A kink's subgradient taken on the wrong side (``clamp(max=0)`` at an exact zero
    once gave the intercept a gradient where the slope had none) breaks this, and made
    the first Adam steps lower the bound."""
    model = random_model(arch, seed=7, **ARCHS[arch]).double()
    x = torch.rand(3, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(3)).double()
    spec = margin_spec(model(x).argmax(1), 10, dtype=torch.float64)
    prop = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    ball = Ball(x, 0.03, "inf")
    bounds = prop.intermediate_bounds(ball, "crown")
    alphas, steps = {}, {}
    gen = torch.Generator().manual_seed(8)
    for a in prop.activations:
        lower, upper = bounds[prop.net.nodes[a].inputs[0]]
        start = prop.net.nodes[a].op.initial_alpha(lower, upper)
        alphas[a] = start[:, None].expand(-1, spec.shape[1], *start.shape[1:]).clone()
        alphas[a].requires_grad_(True)
        unstable = ((lower < 0) & (upper > 0))[:, None].double()
        size = torch.rand(alphas[a].shape, generator=gen, dtype=torch.float64)
        steps[a] = size * unstable * (1 - 2 * start[:, None])  # into [0, 1]
    assert sum(float(s.abs().sum()) for s in steps.values()) > 0
    with torch.enable_grad():
        base = prop.backward(prop.net.output, spec, ball, bounds, alphas).sum()
        grads = torch.autograd.grad(base, list(alphas.values()))
    h = 1e-7
    with torch.no_grad():
        moved = {a: alphas[a] + h * steps[a] for a in alphas}
        quotient = (prop.backward(prop.net.output, spec, ball, bounds, moved).sum() - base) / h
    along = sum((g * steps[a]).sum() for g, a in zip(grads, alphas, strict=True))
    assert float(along) == pytest.approx(float(quotient), rel=1e-4, abs=1e-6)


def _node_values(prop: BoundPropagator, points: torch.Tensor) -> list[torch.Tensor]:
    values = [points]
    for node in prop.net.nodes[1:]:
        values.append(node.op.forward(*[values[j] for j in node.inputs]))
    return values


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_bounds_hold_on_sampled_points(arch):
    """Forward-mode bounds of every ReLU input contain the node's value at 2000 points
    of each box (half of them corners)."""
    model = random_model(arch, seed=6, **ARCHS[arch])
    prop = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    x = torch.rand(3, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(6))
    ball = Ball(x, 0.02, "inf")
    points = sample_ball(x, 0.02, "inf", 2000, seed=7)
    with torch.no_grad():
        bounds = prop.forward_bounds(ball)
        values = _node_values(prop, points.flatten(0, 1))
    assert set(bounds) == set(prop.relu_inputs)
    for i, (lower, upper) in bounds.items():
        v = values[i].reshape(2000, *lower.shape)
        assert (v >= lower - 1e-5).all() and (v <= upper + 1e-5).all()


def test_forward_bounds_tighten_crown_on_few_inputs(monkeypatch):
    """On a 5-input network CROWN's intermediate bounds intersected with forward-mode
    bounds contain sampled values and are never looser than CROWN's alone where they
    matter (neurons CROWN leaves unstable); the output bound is at least as high."""
    from certbench.verifiers.bound_propagation import propagation

    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 4)).eval()
    prop = BoundPropagator(TracedNetwork(model, (5,)))
    x = torch.rand(8, 5, generator=torch.Generator().manual_seed(13))
    ball = Ball(x, 0.1, "inf", clip=False)
    spec = margin_spec(model(x).argmax(1), 4).detach()
    with torch.no_grad():
        both = prop.intermediate_bounds(ball, "crown")
        lb_both = prop.backward(prop.net.output, spec, ball, both)
        monkeypatch.setattr(propagation, "FORWARD_MAX_INPUTS", 0)
        alone = prop.intermediate_bounds(ball, "crown")
        lb_alone = prop.backward(prop.net.output, spec, ball, alone)
        points = x[None] + (2 * torch.rand(2000, *x.shape) - 1) * 0.1
        values = _node_values(prop, points.flatten(0, 1))
    for i, (lower, upper) in both.items():
        v = values[i].reshape(2000, *lower.shape)
        assert (v >= lower - 1e-5).all() and (v <= upper + 1e-5).all()
        inexact = prop.activation_of[i].inexact(*alone[i])
        assert (lower[inexact] >= alone[i][0][inexact] - 1e-6).all()
        assert (upper[inexact] <= alone[i][1][inexact] + 1e-6).all()
    assert (lb_both >= lb_alone - 1e-5).all()
