"""The README's "Adding an operator" example, run as written: LeakyReLU added in one
class and one table entry, then CROWN and alpha-CROWN bounds of a LeakyReLU network
checked against sampled and attacked outputs; the exact verifier refuses it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from certbench.verifiers import UnsupportedLayerError, get_verifier
from certbench.verifiers.bound_propagation import MODULE_OPERATIONS, margin_spec

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def leaky_relu_registered():
    text = README.read_text()
    section = text[text.index("### Adding an operator"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    yield
    MODULE_OPERATIONS.pop(nn.LeakyReLU)


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_readme_operator_gives_sound_bounds(leaky_relu_registered, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.LeakyReLU(0.1), nn.Linear(32, 32),
                          nn.LeakyReLU(0.1), nn.Linear(32, 5)).eval()
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
    with pytest.raises(UnsupportedLayerError, match="LeakyRelu"):
        get_verifier("exact").prepare(model, (1, 4, 4))
