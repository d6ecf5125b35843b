"""The README's "Adding an operator" example, run as written: LeakyReLU added as one class
with its two table entries, then taken through every method that reads the operation:
IBP, CROWN-IBP, CROWN and alpha-CROWN bounds against sampled and attacked outputs; the
MILP against an exhaustive answer on a tiny network; bab against the MILP; the local
Lipschitz constant against sampled gradients; an ONNX file against onnxruntime."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import helper
from test_onnx_import import save_model, weights
from torch import nn

from certbench.io.onnx_import import OnnxRuntime, load_onnx
from certbench.verifiers import Verdict, get_verifier, verdict_code
from certbench.verifiers.bound_propagation import (
    MODULE_OPERATIONS,
    ONNX_ACTIVATIONS,
    margin_spec,
)
from certbench.verifiers.bound_propagation.patches import Patches

README = Path(__file__).resolve().parents[1] / "README.md"
CERTIFIED, FALSIFIED = verdict_code(Verdict.CERTIFIED), verdict_code(Verdict.FALSIFIED)


@pytest.fixture
def leaky_relu_registered():
    text = README.read_text()
    section = text[text.index("### Adding an operator"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    yield
    MODULE_OPERATIONS.pop(nn.LeakyReLU)
    ONNX_ACTIVATIONS.pop("LeakyRelu")


def _leaky_mlp(inputs: int, hidden: int, classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.LeakyReLU(0.1),
                         nn.Linear(hidden, hidden), nn.LeakyReLU(0.1),
                         nn.Linear(hidden, classes)).eval()


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_readme_operator_gives_sound_bounds(leaky_relu_registered, method):
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.LeakyReLU(0.1), nn.Linear(32, 32),
                          nn.LeakyReLU(0.1), nn.Linear(32, 5)).eval()
    torch.manual_seed(0)
    x = torch.rand(6, 1, 4, 4)
    spec = margin_spec(model(x).argmax(1), 5).detach()
    verifier = get_verifier(method)
    verifier.prepare(model, (1, 4, 4))
    eps = 0.1
    with torch.no_grad():
        lb = verifier.margin_lower_bounds(x, spec, eps, "inf")
        points = (x + (2 * torch.rand(2000, *x.shape) - 1) * eps).clamp(0, 1)
        values = (spec @ model(points.flatten(0, 1)).reshape(2000, 6, 5, 1)).squeeze(-1)
    assert (values >= lb - 1e-5).all()
    assert (values.min(0).values - lb).max() < 5  # a bound, not a blanket
    z = x.clone()
    for _ in range(50):
        z = z.detach().requires_grad_(True)
        margin = (spec @ model(z).unsqueeze(-1)).squeeze(-1).min(1).values
        (grad,) = torch.autograd.grad(margin.sum(), z)
        z = torch.minimum(torch.maximum(z - 0.02 * grad.sign(), x - eps), x + eps).clamp(0, 1)
    with torch.no_grad():
        assert ((spec @ model(z).unsqueeze(-1)).squeeze(-1) >= lb - 1e-5).all()


def test_readme_operator_on_windows_in_alpha_crown(leaky_relu_registered, monkeypatch):
    """On a convolutional network alpha-CROWN keeps the intermediate rows' slopes on
    their windows, and the generic relaxation reads them there: the same bounds as with
    dense coefficients everywhere (no windows), and below sampled outputs."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 3, 2, 1),
                          nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(64, 16), nn.LeakyReLU(0.1),
                          nn.Linear(16, 5)).eval()
    x = torch.rand(4, 1, 16, 16)
    spec = margin_spec(model(x).argmax(1), 5).detach()
    verifier = get_verifier("alpha-crown", alpha_iterations=5)
    verifier.prepare(model, (1, 16, 16))
    with torch.no_grad():
        windows = verifier.margin_lower_bounds(x, spec, 0.05, "inf")
        monkeypatch.setattr(Patches, "worth_keeping", lambda self: False)
        verifier.prepare(model, (1, 16, 16))  # a new propagator: no windows kept
        dense = verifier.margin_lower_bounds(x, spec, 0.05, "inf")
        points = (x + (2 * torch.rand(500, *x.shape) - 1) * 0.05).clamp(0, 1)
        values = (spec @ model(points.flatten(0, 1)).reshape(500, 4, 5, 1)).squeeze(-1)
    torch.testing.assert_close(windows, dense, rtol=1e-4, atol=1e-4)
    assert (values >= windows - 1e-5).all()


def _exhaustive(model: nn.Module, x: torch.Tensor, eps: float, steps: int = 301) -> str:
    """The true answer on a 2-input network: the smallest margin over a grid of the l_inf
    ball (clipped to [0, 1]), widened by the margin's Lipschitz constant times the grid's
    half diagonal. ``robust`` / ``flipped`` where that decides, else ``unclear``."""
    y = int(model(x).argmax(1))
    lo, hi = (x[0] - eps).clamp(0, 1), (x[0] + eps).clamp(0, 1)
    axes = [torch.linspace(float(lo[i]), float(hi[i]), steps) for i in range(2)]
    grid = torch.cartesian_prod(*axes)
    with torch.no_grad():
        out = model(grid)
    margin = (out[:, y:y + 1] - out).masked_fill(torch.arange(out.shape[1]) == y, math.inf)
    smallest = float(margin.min())
    weights = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    lipschitz = 2 * math.prod(float(torch.linalg.matrix_norm(w, 2)) for w in weights)
    half_diagonal = float((hi - lo).norm()) / (steps - 1) / 2
    if smallest < 0:
        return "flipped"
    return "robust" if smallest - lipschitz * half_diagonal > 0 else "unclear"


def test_readme_operator_in_the_milp_and_bab(leaky_relu_registered):
    """On a 2-input LeakyReLU network the MILP certifies exactly the robust balls and
    falsifies exactly the flipped ones (where the exhaustive answer is clear), and bab,
    complete too, gives the same verdicts."""
    model = _leaky_mlp(2, 12, 3)
    with torch.no_grad():  # every class ties at the box's centre: boundaries run through it
        centre = model(torch.full((1, 2), 0.5))[0]
        model[-1].bias += centre.max() - centre
    exact, bab = get_verifier("exact"), get_verifier("bab", time_limit_s=30.0)
    exact.prepare(model, (2,))
    bab.prepare(model, (2,))
    x = torch.rand(24, 2, generator=torch.Generator().manual_seed(3))
    seen = set()
    for eps in (0.05, 0.2):
        milp = exact.certify(x, "inf", [eps]).verdicts[:, 0]
        branch = bab.certify(x, "inf", [eps]).verdicts[:, 0]
        assert torch.equal(milp, branch), (milp, branch)
        for n in range(len(x)):
            truth = _exhaustive(model, x[n:n + 1], eps)
            seen.add(truth)
            if truth == "robust":
                assert milp[n] == CERTIFIED
            elif truth == "flipped":
                assert milp[n] == FALSIFIED
    assert {"robust", "flipped"} <= seen  # both answers were exercised


def test_readme_operator_in_the_local_lipschitz_bound(leaky_relu_registered):
    """The local constant of each margin bounds the dual norm of its gradient at points
    sampled in the ball (l_inf ball: the l1 norm of the gradient)."""
    model = _leaky_mlp(16, 24, 4, seed=1)
    verifier = get_verifier("local-lipschitz")
    verifier.prepare(model, (16,))
    x = torch.rand(5, 16, generator=torch.Generator().manual_seed(0))
    eps = 0.05
    spec = margin_spec(model(x).argmax(1), 4).detach()
    constants = verifier.local_constants(x, spec, eps, "inf")
    points = (x + (2 * torch.rand(400, *x.shape) - 1) * eps).clamp(0, 1).requires_grad_(True)
    margins = (spec @ model(points.flatten(0, 1)).reshape(400, 5, 4, 1)).squeeze(-1)
    for row in range(spec.shape[1]):
        (grad,) = torch.autograd.grad(margins[..., row].sum(), points, retain_graph=True)
        assert (grad.abs().sum(-1).max(0).values <= constants[:, row] + 1e-6).all()


def test_readme_operator_from_an_onnx_file(leaky_relu_registered, tmp_path):
    rng = np.random.default_rng(0)
    node = helper.make_node
    nodes = [node("Gemm", ["x", "w0", "b0"], ["h"], transB=1),
             node("LeakyRelu", ["h"], ["a"], alpha=0.2),
             node("Gemm", ["a", "w1", "b1"], ["y"], transB=1)]
    path = save_model(tmp_path / "leaky.onnx", nodes,
                      {"w0": weights(rng, 8, 4), "b0": weights(rng, 8),
                       "w1": weights(rng, 3, 8), "b1": weights(rng, 3)}, [1, 4], [1, 3])
    network = load_onnx(path)
    x = np.random.default_rng(1).random((1, 4), dtype=np.float32)
    with torch.no_grad():
        ours = network.module(torch.from_numpy(x)).numpy()
    assert np.abs(ours - OnnxRuntime(network)(x)).max() < 1e-5
    verifier = get_verifier("crown")
    verifier.prepare(network.module, network.input_shape)
    cert = verifier.certify(torch.from_numpy(x), "inf", [0.01, 0.1])
    assert cert.verdicts.shape == (1, 2)


def test_readme_operator_in_the_global_lipschitz_bound(leaky_relu_registered):
    """LeakyReLU's Lipschitz constant from its slopes: no PGD point inside a certified l2
    radius changes the prediction, and the radii are not vacuous."""
    from certbench.run.attacks import pgd

    model = _leaky_mlp(16, 24, 4, seed=2)
    verifier = get_verifier("global-lipschitz")
    verifier.prepare(model, (16,))
    x = torch.rand(40, 16, generator=torch.Generator().manual_seed(1))
    cert = verifier.certify(x, "2", [0.01])
    radius = cert.radius.float()
    assert (radius > 0).any()
    prediction = model(x).argmax(1)
    found, success = pgd(model, x, prediction, radius * 0.999, "2", steps=100, restarts=5)
    assert not success[radius > 0].any()
