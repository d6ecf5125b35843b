"""`IndexMap` (slicing, gathering, padding, summing ... as y = S x + b) under every rule
the engine has: the backward step against autograd's transpose, interval bounds and the
bound methods against samples and PGD, the Lipschitz rule against S's spectral norm, the
MILP and bab against each other, the local Lipschitz bound against sampled gradients;
and the ONNX operations that have no rule refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper
from test_onnx_import import save_model
from torch import nn

from certbench.io.onnx_import import UnsupportedOnnxOperation, load_onnx
from certbench.verifiers import Verdict, get_verifier, verdict_code
from certbench.verifiers.bound_propagation import margin_spec
from certbench.verifiers.bound_propagation.index_map import IndexMap, IndexMapOperation


def _random_map(seed: int, n_in: int = 12, n_out: int = 9, extra: int = 6,
                signed: bool = False) -> IndexMap:
    """Each output one source (a selection), plus ``extra`` further terms (sums), weights
    1 or random, a pad-like bias on some outputs."""
    gen = torch.Generator().manual_seed(seed)
    out_index = torch.cat([torch.arange(n_out), torch.randint(0, n_out, (extra,), generator=gen)])
    in_index = torch.randint(0, n_in, (len(out_index),), generator=gen)
    weight = torch.randn(len(out_index), generator=gen) if signed else torch.ones(len(out_index))
    bias = torch.where(torch.rand(n_out, generator=gen) < 0.3, 0.5, 0.0)
    return IndexMap(out_index, in_index, weight, bias, (n_in,), (n_out,))


def _dense(m: IndexMap) -> torch.Tensor:
    matrix = torch.zeros(m.bias.numel(), np.prod(m.input_shape), dtype=torch.float64)
    matrix.index_put_((m.out_index, m.in_index), m.weight.double(), accumulate=True)
    return matrix


@pytest.mark.parametrize("signed", [False, True])
def test_backward_is_the_transpose_and_bounds_are_exact(signed):
    m = _random_map(0, signed=signed)
    op = IndexMapOperation(m)
    x = torch.randn(3, 12, dtype=torch.float64)
    matrix = _dense(m)
    assert torch.allclose(m(x.float()).double(), x @ matrix.T + m.bias.double(), atol=1e-6)
    a = torch.randn(3, 4, 9)
    (coefficients,), constant = op.backward(a)
    assert torch.allclose(coefficients.double(), a.double() @ matrix, atol=1e-5)
    assert torch.allclose(constant.double(), a.double() @ m.bias.double(), atol=1e-5)
    (absolute,) = op.abs_backward(a.abs())
    assert torch.allclose(absolute.double(), a.abs().double() @ matrix.abs(), atol=1e-5)
    lower, upper = x.float() - 0.1, x.float() + 0.2
    lo, hi = op.ibp((lower, upper))
    points = lower + (upper - lower) * torch.rand(500, 3, 12)
    values = m(points.reshape(-1, 12)).reshape(500, 3, 9)
    assert (values >= lo - 1e-5).all() and (values <= hi + 1e-5).all()
    corner = torch.where(matrix.T.float()[None] > 0, upper[..., None], lower[..., None])
    assert torch.allclose(hi, (corner * matrix.T.float()).sum(1) + m.bias, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_lipschitz_rule_bounds_the_spectral_norm(seed):
    m = _random_map(seed, signed=seed % 2 == 1)
    bound = IndexMapOperation(m).lipschitz([torch.tensor(1.0, dtype=torch.float64)])
    assert float(bound) >= float(torch.linalg.matrix_norm(_dense(m), 2)) - 1e-9


def _net(seed: int, inputs: int = 2) -> nn.Module:
    """Dense, ReLU, an index map that repeats, drops and adds up hidden units, ReLU,
    Dense: the map's rule inside every method."""
    torch.manual_seed(seed)
    m = IndexMap(torch.tensor([0, 1, 2, 3, 4, 5, 5]), torch.tensor([3, 0, 0, 7, 5, 2, 6]),
                 torch.tensor([1.0, 1.0, -0.5, 1.0, 2.0, 1.0, 1.0]), torch.zeros(6), (8,), (6,))
    model = nn.Sequential(nn.Linear(inputs, 8), nn.ReLU(), m, nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():  # every class ties at the box's centre
        centre = model(torch.full((1, inputs), 0.5))[0]
        model[-1].bias += centre.max() - centre
    return model


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_bound_methods_through_an_index_map_contain_samples_and_attacks(method):
    model = _net(0, inputs=6)
    x = torch.rand(5, 6, generator=torch.Generator().manual_seed(1))
    spec = margin_spec(model(x).argmax(1), 3).detach()
    verifier = get_verifier(method)
    verifier.prepare(model, (6,))
    eps = 0.1
    with torch.no_grad():
        lb = verifier.margin_lower_bounds(x, spec, eps, "inf")
        points = (x + (2 * torch.rand(2000, *x.shape) - 1) * eps).clamp(0, 1)
        values = (spec @ model(points.flatten(0, 1)).reshape(2000, 5, 3, 1)).squeeze(-1)
    assert (values >= lb - 1e-5).all()
    z = x.clone()
    for _ in range(50):
        z = z.detach().requires_grad_(True)
        margin = (spec @ model(z).unsqueeze(-1)).squeeze(-1).min(1).values
        (grad,) = torch.autograd.grad(margin.sum(), z)
        z = torch.minimum(torch.maximum(z - 0.02 * grad.sign(), x - eps), x + eps).clamp(0, 1)
    with torch.no_grad():
        assert ((spec @ model(z).unsqueeze(-1)).squeeze(-1) >= lb - 1e-5).all()


def test_milp_and_bab_agree_through_an_index_map():
    model = _net(2)
    exact, bab = get_verifier("exact"), get_verifier("bab", time_limit_s=30.0)
    exact.prepare(model, (2,))
    bab.prepare(model, (2,))
    x = torch.rand(16, 2, generator=torch.Generator().manual_seed(3))
    seen = set()
    for eps in (0.05, 0.2):
        milp = exact.certify(x, "inf", [eps]).verdicts[:, 0]
        branch = bab.certify(x, "inf", [eps]).verdicts[:, 0]
        assert torch.equal(milp, branch), (milp, branch)
        seen |= set(milp.tolist())
    assert {verdict_code(Verdict.CERTIFIED), verdict_code(Verdict.FALSIFIED)} <= seen


def test_local_and_global_lipschitz_through_an_index_map():
    model = _net(4, inputs=6)
    x = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    eps = 0.05
    spec = margin_spec(model(x).argmax(1), 3).detach()
    local = get_verifier("local-lipschitz")
    local.prepare(model, (6,))
    constants = local.local_constants(x, spec, eps, "inf")
    points = (x + (2 * torch.rand(400, *x.shape) - 1) * eps).clamp(0, 1).requires_grad_(True)
    margins = (spec @ model(points.flatten(0, 1)).reshape(400, 5, 3, 1)).squeeze(-1)
    for row in range(spec.shape[1]):
        (grad,) = torch.autograd.grad(margins[..., row].sum(), points, retain_graph=True)
        assert (grad.abs().sum(-1).max(0).values <= constants[:, row] + 1e-6).all()
    glob = get_verifier("global-lipschitz")
    glob.prepare(model, (6,))
    radius = glob.certify(x, "2", [0.01]).radius
    assert (radius >= 0).all() and torch.isfinite(radius).all()


REFUSED = {  # nodes, weights, input shape, output shape, the reason's words
    "resize-linear": ([helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear")],
                      {"s": np.array([1, 1, 2, 2], np.float32)}, [1, 1, 2, 2], [1, 1, 4, 4],
                      "interpolation"),
    "gather-along-the-batch": ([helper.make_node("Gather", ["x", "i"], ["y"], axis=0)],
                               {"i": np.array([0, 0], np.int64)}, [1, 3], [2, 3],
                               "batch dimension"),
    "transpose-of-the-batch": ([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])],
                               {}, [1, 3], [3, 1], "batch dimension"),
    "argmax": ([helper.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=1)], {}, [1, 3],
               [1, 1], "ArgMax"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_operations_without_a_rule_are_refused_in_one_line(tmp_path, case):
    nodes, values, shape_in, shape_out, words = REFUSED[case]
    path = save_model(tmp_path / "net.onnx", nodes, values, shape_in, shape_out)
    with pytest.raises(UnsupportedOnnxOperation) as caught:
        load_onnx(path)
    message = str(caught.value)
    assert words in message and "\n" not in message and str(path) in message
