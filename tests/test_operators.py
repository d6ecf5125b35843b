"""Property tests for every operator of the bound-propagation engine, one parametrised
case per operator: a linear operator's backward is the vector-Jacobian product of its
forward pass (plus its constant), its fast row and patch paths equal the dense one, its
interval contains sampled outputs; an activation's relaxed backward step is a lower
bound at dense samples and at PGD-optimised inputs of its input box."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certbench.verifiers import UnsupportedLayerError, get_verifier
from certbench.verifiers.bound_propagation import Ball, BoundPropagator, TracedNetwork, margin_spec
from certbench.verifiers.bound_propagation.index_map import IndexMap, IndexMapOperation
from certbench.verifiers.bound_propagation.operators import (
    Activation,
    AvgPool,
    BatchNormEval,
    Concat,
    Conv,
    ConvTranspose,
    Dense,
    Elementwise,
    MaxPool,
    Relu,
    Reshape,
    Sigmoid,
    Sum,
    Tanh,
)
from certbench.verifiers.bound_propagation.patches import Patches, rowdot


def _batchnorm():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(-1.5, 1.5)
    return BatchNormEval(bn, (3, 6, 6))


def _linear_cases():
    torch.manual_seed(0)
    return {
        "dense": (lambda: Dense(nn.Linear(12, 5)), [(12,)]),
        "conv": (lambda: Conv(nn.Conv2d(3, 4, 3, 2, 1), (3, 7, 7)), [(3, 7, 7)]),
        "conv-grouped": (lambda: Conv(nn.Conv2d(4, 6, 3, 1, 1, groups=2), (4, 6, 6)),
                         [(4, 6, 6)]),
        "conv-depthwise": (lambda: Conv(nn.Conv2d(3, 3, 3, 1, 1, groups=3), (3, 5, 5)),
                           [(3, 5, 5)]),
        "conv-dilated": (lambda: Conv(nn.Conv2d(2, 3, 3, 2, 2, dilation=2), (2, 9, 9)),
                         [(2, 9, 9)]),
        "conv-rect": (lambda: Conv(nn.Conv2d(3, 2, (3, 2), (1, 2), (0, 1)), (3, 6, 6)),
                      [(3, 6, 6)]),
        "elementwise": (lambda: Elementwise(torch.rand(1, 3, 1, 1) + 0.5,
                                            torch.randn(1, 3, 1, 1)), [(3, 6, 6)]),
        "batchnorm": (_batchnorm, [(3, 6, 6)]),
        "avgpool": (lambda: AvgPool(nn.AvgPool2d(2), (3, 6, 6)), [(3, 6, 6)]),
        "reshape": (lambda: Reshape((3, 4, 4), (48,)), [(3, 4, 4)]),
        "sum": (lambda: Sum((1.0, -1.0)), [(3, 4, 4), (3, 4, 4)]),
        "concat": (lambda: Concat(1, (2, 3)), [(2, 4, 4), (3, 4, 4)]),
        "conv-transpose": (lambda: ConvTranspose(nn.ConvTranspose2d(3, 4, 3, 2, 1, 1)),
                           [(3, 5, 5)]),
        "conv-transpose-grouped": (lambda: ConvTranspose(nn.ConvTranspose2d(
            4, 6, (2, 3), (2, 1), (0, 1), groups=2, dilation=(1, 2))), [(4, 4, 5)]),
        "index-map": (lambda: IndexMapOperation(IndexMap(
            torch.tensor([0, 1, 2, 2, 5]), torch.tensor([7, 0, 3, 3, 11]),
            torch.tensor([1.0, -2.0, 0.5, 1.0, 1.0]), torch.tensor([0, 0, 0, 0.5, 0, 0]),
            (3, 2, 2), (2, 3))), [(3, 2, 2)]),
    }


LINEAR = _linear_cases()


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_linear_backward_is_the_vjp_of_forward(case):
    make, shapes = LINEAR[case]
    op = make()
    xs = [torch.randn(2, *s, dtype=torch.float64) for s in shapes]
    op = _double(op)
    y = op.forward(*xs)
    a = torch.randn(2, 3, *y.shape[1:], dtype=torch.float64)
    inputs, const = op.backward(a)
    for r in range(a.shape[1]):  # sum(a_r * op(x)) == sum_i sum(a_i,r * x_i) + const_r
        lhs = (a[:, r] * y).flatten(1).sum(1)
        rhs = sum((a_i[:, r] * x).flatten(1).sum(1) for a_i, x in zip(inputs, xs, strict=True))
        rhs = rhs + (const[:, r] if torch.is_tensor(const) else const)
        torch.testing.assert_close(lhs, rhs)
    abs_inputs = op.abs_backward(a.abs())
    for a_i, x in zip(abs_inputs, xs, strict=True):  # |W|^T |a| >= |W^T a| entrywise
        assert a_i.shape[2:] == x.shape[1:]
    for got, dense in zip(abs_inputs, inputs, strict=True):
        assert (got >= dense.abs() - 1e-9).all()


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_linear_rows_and_patches_equal_the_dense_backward(case):
    make, shapes = LINEAR[case]
    op = _double(make())
    y = op.forward(*[torch.zeros(1, *s, dtype=torch.float64) for s in shapes])
    shape = tuple(y.shape[1:])
    n = int(torch.tensor(shape).prod())
    index = torch.randint(0, n, (2, 5), generator=torch.Generator().manual_seed(1))
    fast, fast_const = op.backward_rows(index, shape, torch.float64)
    one_hot = nn.functional.one_hot(index, n).double().reshape(2, 5, *shape)
    dense, dense_const = op.backward(one_hot)
    for f, d in zip(fast, dense, strict=True):
        torch.testing.assert_close(f.to_dense() if isinstance(f, Patches) else f, d)
    torch.testing.assert_close(torch.as_tensor(fast_const, dtype=torch.float64) + 0 * dense[0]
                               .flatten(2)[..., 0], torch.as_tensor(dense_const,
                               dtype=torch.float64) + 0 * dense[0].flatten(2)[..., 0])
    if op.accepts_patches and len(shape) == 3:  # a patch through the operation
        patch = _random_patch(shape)
        out, const = op.backward(patch)
        ref, ref_const = op.backward(patch.to_dense())
        torch.testing.assert_close(out[0].to_dense() if isinstance(out[0], Patches) else out[0],
                                   ref[0])
        torch.testing.assert_close(torch.as_tensor(const) + 0.0, torch.as_tensor(ref_const) + 0.0)


@pytest.mark.parametrize("rows", [1, 15, 40])
def test_rowdot_is_the_row_by_row_dot_product(rows):
    """Both ways `rowdot` computes (a vector per sample, one shared vector) give
    sum_k a[b, r, k] v[b, k]."""
    gen = torch.Generator().manual_seed(rows)
    a = torch.randn(3, rows, 50, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(rowdot(a, v), torch.einsum("brk,bk->br", a, v))
    torch.testing.assert_close(rowdot(a, v[:1]), torch.einsum("brk,k->br", a, v[0]))


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_linear_interval_contains_samples(case):
    make, shapes = LINEAR[case]
    op = make()
    lows = [torch.randn(1, *s) for s in shapes]
    highs = [lo + torch.rand(1, *s) for lo, s in zip(lows, shapes, strict=True)]
    lower, upper = op.ibp(*zip(lows, highs, strict=True))
    with torch.no_grad():
        for _ in range(20):
            xs = [lo + torch.rand(64, *lo.shape[1:]) * (hi - lo)
                  for lo, hi in zip(lows, highs, strict=True)]
            y = op.forward(*xs)
            assert (y >= lower - 1e-5).all() and (y <= upper + 1e-5).all()


ACTIVATIONS = {"relu": Relu, "sigmoid": Sigmoid, "tanh": Tanh}


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "patches"])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_relaxation_is_a_lower_bound(name, dense):
    """min over the box of sum(a * g(z)) >= sum(a' * z) + c, checked at dense samples and
    at points where projected gradient descent pushes the gap down."""
    op = ACTIVATIONS[name]()
    gen = torch.Generator().manual_seed(4)
    shape = (3, 5, 5)
    center = 3 * torch.randn(2, *shape, generator=gen)
    lower = center - 2 * torch.rand(2, *shape, generator=gen)
    upper = center + 2 * torch.rand(2, *shape, generator=gen)
    a = torch.randn(2, 4, *shape, generator=gen)
    alpha = torch.rand(2, 4, *shape, generator=gen) if name == "relu" else None
    for slopes in (None, alpha):
        coeff = a if dense else _random_patch(shape, rows=4, gen=gen)
        a_in, const = op.relaxed_backward(coeff, lower, upper, slopes if dense else None)
        a_full = coeff if dense else coeff.to_dense()
        a_in = a_in if dense else a_in.to_dense()

        def gap(z, a_full=a_full, a_in=a_in, const=const):  # true - bound: must be >= 0
            true = (a_full * op.forward(z).unsqueeze(1)).flatten(2).sum(-1)
            return true - ((a_in * z.unsqueeze(1)).flatten(2).sum(-1) + const)

        z = lower + torch.rand(256, *lower.shape, generator=gen) * (upper - lower)
        assert (torch.stack([gap(p) for p in z]) >= -1e-4).all()
        z = (lower + upper) / 2
        for _ in range(50):  # PGD on the gap
            z = z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(gap(z).sum(), z)
            z = torch.minimum(torch.maximum(z - 0.2 * grad.sign(), lower), upper)
        assert (gap(z.detach()) >= -1e-4).all()


def _random_patch(shape, rows=3, gen=None) -> Patches:
    gen = gen or torch.Generator().manual_seed(2)
    c, h, w = shape
    kh, kw = max(1, h - 2), max(1, w - 3)
    values = torch.randn(2, rows, c, kh, kw, generator=gen, dtype=torch.float64)
    top = torch.randint(-1, h - kh + 2, (2, rows), generator=gen)
    left = torch.randint(-1, w - kw + 2, (2, rows), generator=gen)
    patch = Patches(values, top, left, shape)
    return patch.with_values(values * patch.inside())


def _double(op):
    """The operation with its module's parameters in float64 (a copy)."""
    module = getattr(op, "module", None)
    if module is not None:
        op.module = module.double()
    for name in ("weight", "bias"):
        value = getattr(op, name, None)
        if torch.is_tensor(value):
            setattr(op, name, value.double())
    if isinstance(op, Elementwise) and not isinstance(op, BatchNormEval):
        op.scale, op.shift = (torch.as_tensor(t).double() for t in (op.scale, op.shift))
    return op


class _Dense(nn.Module):
    """Conv stem, a DenseNet-style concatenation, a grouped conv, max pooling and an
    S-shaped head."""

    def __init__(self, activation):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 16),
                                  activation(), nn.Linear(16, 10))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.cat([h, torch.relu(self.grouped(h))], dim=1))


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.Tanh, nn.ReLU])
def test_new_operators_in_a_network_are_sound(activation, method):
    torch.manual_seed(3)
    model = _Dense(activation).eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = margin_spec(model(x).argmax(1), 10).detach()
    prop = BoundPropagator(TracedNetwork(model, (1, 8, 8)))
    ball = Ball(x, 0.03, "inf")
    with torch.no_grad():
        lb = prop.lower_bound(spec, ball, method, alpha_iterations=5)
        points = (x + (2 * torch.rand(512, *x.shape) - 1) * 0.03).clamp(0, 1)
        points[:256] = (x + torch.sign(torch.randn(256, *x.shape)) * 0.03).clamp(0, 1)
        values = (spec @ model(points.flatten(0, 1)).reshape(512, 4, 10, 1)).squeeze(-1)
    assert (values >= lb - 1e-5).all()
    z = x.clone()
    for _ in range(30):  # PGD on the smallest margin
        z = z.detach().requires_grad_(True)
        margin = (spec @ model(z).unsqueeze(-1)).squeeze(-1).min(1).values
        (grad,) = torch.autograd.grad(margin.sum(), z)
        z = torch.minimum(torch.maximum(z - 0.01 * grad.sign(), x - 0.03), x + 0.03).clamp(0, 1)
    with torch.no_grad():
        assert ((spec @ model(z).unsqueeze(-1)).squeeze(-1) >= lb - 1e-5).all()


def test_exact_verifier_refuses_a_sigmoid_network():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Sigmoid(), nn.Linear(8, 10)).eval()
    with pytest.raises(UnsupportedLayerError, match="Sigmoid"):
        get_verifier("exact").prepare(model, (1, 8, 8))
    with pytest.raises(UnsupportedLayerError, match="Sigmoid"):
        get_verifier("local-lipschitz").prepare(model, (1, 8, 8))


def test_relu_fast_backward_equals_the_generic_relaxation():
    """ReLU's hot-loop backward step and the generic one built from its `relaxation`."""
    gen = torch.Generator().manual_seed(5)
    lower = torch.randn(2, 3, 4, 4, generator=gen)
    upper = lower + torch.rand(2, 3, 4, 4, generator=gen)
    a = torch.randn(2, 5, 3, 4, 4, generator=gen)
    alpha = torch.rand(2, 5, 3, 4, 4, generator=gen)
    for slopes in (None, alpha):
        fast = Relu().relaxed_backward(a, lower, upper, slopes)
        generic = Activation.relaxed_backward(Relu(), a, lower, upper, slopes)
        torch.testing.assert_close(fast, generic)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)])
def test_maxpool_relaxation_is_a_lower_bound(kernel, stride, padding):
    """Also with narrow boxes, where one input of a window often dominates (exact)."""
    gen = torch.Generator().manual_seed(kernel + stride)
    op = MaxPool(nn.MaxPool2d(kernel, stride, padding), (3, 7, 7))
    for width in (2.0, 0.05):
        lower = torch.randn(2, 3, 7, 7, generator=gen)
        upper = lower + width * torch.rand(2, 3, 7, 7, generator=gen)
        a = torch.randn(2, 4, *op.forward(lower).shape[1:], generator=gen)
        a_in, const = op.relaxed_backward(a, lower, upper)

        def gap(z, a=a, a_in=a_in, const=const):
            true = (a * op.forward(z).unsqueeze(1)).flatten(2).sum(-1)
            return true - ((a_in * z.unsqueeze(1)).flatten(2).sum(-1) + const)

        z = lower + torch.rand(512, *lower.shape, generator=gen) * (upper - lower)
        assert (torch.stack([gap(p) for p in z]) >= -1e-5).all()
        z = (lower + upper) / 2
        for _ in range(50):
            z = z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(gap(z).sum(), z)
            z = torch.minimum(torch.maximum(z - 0.1 * width * grad.sign(), lower), upper)
        assert (gap(z.detach()) >= -1e-5).all()
    point = torch.rand(2, 3, 7, 7, generator=gen)  # a point box: the bound is exact
    a_in, const = op.relaxed_backward(a, point, point)
    exact = (a * op.forward(point).unsqueeze(1)).flatten(2).sum(-1)
    torch.testing.assert_close((a_in * point.unsqueeze(1)).flatten(2).sum(-1) + const, exact)


@pytest.mark.parametrize("case", ["conv-transpose", "conv-transpose-grouped", "index-map"])
def test_lipschitz_rule_bounds_the_spectral_norm_of_the_map(case):
    make, shapes = LINEAR[case]
    op = _double(make())
    x = torch.zeros(1, *shapes[0], dtype=torch.float64)

    def linear_part(v):
        return op.forward(v) - op.forward(x)

    jacobian = torch.autograd.functional.jacobian(linear_part, x).reshape(
        op.forward(x).numel(), x.numel())
    bound = op.lipschitz([torch.tensor(1.0, dtype=torch.float64)])
    assert float(bound.detach()) >= float(torch.linalg.matrix_norm(jacobian, 2)) - 1e-9
