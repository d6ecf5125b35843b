"""The per-cell attack: on a linear classifier, whose smallest adversarial l2 and l_inf
distances have closed forms, the bisection lands within a few percent of them; the grid
successes agree with those distances.

With more than two classes the untargeted margin loss follows the currently strongest
other class, which need not have the nearest boundary (on the 3-class model below, one
point of 24 at 1.077x the minimum in l2); targeted runs toward the runner-up classes fix
that."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certbench.run.attacks import attack_grid, distance
from conftest import DIGITS_SHAPE


def linear_setup(seed: int = 0, classes: int = 2):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, classes)).eval()
    x = (0.3 + 0.4 * torch.rand(24, 64)).view(-1, *DIGITS_SHAPE)  # inside the box, away from it
    with torch.no_grad():
        logits = model(x).double()
    w = model[1].weight.detach().double()
    prediction = logits.argmax(1)
    margins = logits.gather(1, prediction[:, None]) - logits
    diff = w[prediction][:, None, :] - w[None]
    exact = {}
    for norm, dual in (("2", 2), ("inf", 1)):
        ratio = margins / diff.norm(p=dual, dim=2).clamp(min=1e-12)
        ratio[torch.arange(len(x)), prediction] = torch.inf
        exact[norm] = ratio.min(dim=1).values
    return model, x, exact


@pytest.mark.parametrize("classes,targeted", [(2, 0), (3, 2)])
@pytest.mark.parametrize("norm", ["2", "inf"])
def test_smallest_distance_is_within_a_few_percent_of_the_exact_minimum(norm, classes, targeted):
    model, x, exact = linear_setup(classes=classes)
    keep = exact[norm] < (0.8 if norm == "2" else 0.15)  # the box does not bind there
    model_x, exact_d = x[keep], exact[norm][keep]
    assert len(exact_d) >= 5
    grid = [float(exact_d.median()) * f for f in (0.5, 1.0, 1.5)]
    outcome = attack_grid(model, model_x, grid, norm, steps=50, restarts=2, bisection_steps=10,
                          targeted=targeted)
    found = outcome.distance
    assert torch.isfinite(found).all()
    assert (found >= exact_d * (1 - 1e-4)).all()  # nothing beats the true minimum
    assert (found <= exact_d * 1.03).all()  # and PGD gets within 3 %
    grid_t = torch.tensor(grid, dtype=torch.float64)
    clear = (exact_d[:, None] - grid_t).abs() > 0.01 * grid_t  # not on the boundary itself
    expected = exact_d[:, None] < grid_t
    assert torch.equal(outcome.success[clear], expected[clear])


def test_distance_helper():
    x = torch.zeros(2, 1, 2, 2)
    points = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.0]]).view(2, 1, 2, 2)
    assert distance(points, x, "2").tolist() == [5.0, pytest.approx(2.2913, abs=1e-4)]
    assert distance(points, x, "inf").tolist() == [4.0, 2.0]
