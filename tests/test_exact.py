"""The exact MILP verifier is the ground truth: it agrees with a dense grid on 2-D
networks, confirms every certificate of the incomplete verifiers, and each of its
counterexamples really changes the prediction inside the ball."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certbench.verifiers import VERDICTS, Verdict, get_verifier, verdict_code
from conftest import DIGITS_SHAPE, random_model

CERTIFIED, FALSIFIED = verdict_code(Verdict.CERTIFIED), verdict_code(Verdict.FALSIFIED)


def test_exact_minimum_matches_a_dense_grid_in_two_dimensions():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 3)).eval()
    x = torch.tensor([[0.5, 0.4]])
    eps = 0.2
    verifier = get_verifier("exact")
    verifier.prepare(model, (2,))
    cert = verifier.certify(x, "inf", [eps])
    y = int(cert.prediction[0])
    grid = torch.stack(torch.meshgrid(
        torch.linspace(0.3, 0.7, 401), torch.linspace(0.2, 0.6, 401), indexing="ij"
    ), -1).reshape(-1, 2)
    with torch.no_grad():
        out = model(grid)
    margin = out[:, y:y + 1] - out
    margin[:, y] = float("inf")
    grid_min = margin.min().item()
    exact_min = cert.columns["margin_min"][0, 0].item()
    assert exact_min <= grid_min + 1e-6  # the exact minimum is never above a sampled one
    assert grid_min - exact_min < 0.01  # and the grid (spacing 1e-3) gets close to it
    expected = FALSIFIED if grid_min < 0 else CERTIFIED
    assert cert.verdicts[0, 0] == expected


SMALL_MODELS = {  # (architecture arguments, seed, epsilon grid): a mix of outcomes
    "mlp": ({"widths": [16, 16]}, 11, [0.002, 0.01, 0.03]),
    "cnn-small": ({"width": 1, "linear_size": 16}, 12, [0.01, 0.05]),
    "resnet-tiny": ({"channels": 2, "blocks": 1, "hidden": 8}, 12, [0.01, 0.05]),
}


@pytest.mark.parametrize("arch", sorted(SMALL_MODELS))
def test_exact_confirms_every_incomplete_certificate(arch):
    arch_args, seed, eps = SMALL_MODELS[arch]
    model = random_model(arch, seed=seed, **arch_args)
    x = torch.rand(6, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(5))
    exact = get_verifier("exact", time_limit_s=60)
    exact.prepare(model, DIGITS_SHAPE)
    truth = exact.certify(x, "inf", eps)
    assert (truth.verdicts == CERTIFIED).any() and (truth.verdicts == FALSIFIED).any()
    for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        verifier = get_verifier(method)
        verifier.prepare(model, DIGITS_SHAPE)
        cert = verifier.certify(x, "inf", eps)
        claimed = cert.verdicts == CERTIFIED
        assert (truth.verdicts[claimed] == CERTIFIED).all(), f"{method} certified a false point"
    for (n, k), point in exact.counterexamples.items():
        assert (point - x[n]).abs().max() <= eps[k] + 1e-6
        assert 0 <= point.min() and point.max() <= 1
        with torch.no_grad():
            assert model(point).argmax(1) != model(x[n : n + 1]).argmax(1)
    assert len(exact.counterexamples) == int((truth.verdicts == FALSIFIED).sum())


def test_exact_on_a_trained_model(trained, digits):
    """A GloRo-trained MLP: everything CROWN certifies, the exact verifier certifies too,
    and it certifies at least as many points (it is complete)."""
    model = trained["mlp-gloro"]
    x = digits.x_test[:10]
    exact = get_verifier("exact")
    exact.prepare(model, DIGITS_SHAPE)
    crown = get_verifier("crown")
    crown.prepare(model, DIGITS_SHAPE)
    truth, bound = exact.certify(x, "inf", [0.02, 0.05]), crown.certify(x, "inf", [0.02, 0.05])
    assert (truth.verdicts[bound.verdicts == CERTIFIED] == CERTIFIED).all()
    assert (truth.verdicts == CERTIFIED).sum() >= (bound.verdicts == CERTIFIED).sum()
    names = {VERDICTS[v].value for v in truth.verdicts.reshape(-1).tolist()}
    assert names <= {"certified", "falsified"}  # small enough to be decided


def test_exact_refuses_l2():
    verifier = get_verifier("exact")
    verifier.prepare(random_model("mlp", widths=[4]), DIGITS_SHAPE)
    with pytest.raises(ValueError, match="only l_inf"):
        verifier.certify(torch.rand(1, *DIGITS_SHAPE), "2", [0.1])


def test_exact_leaves_the_callers_model_in_float32():
    model = random_model("mlp", widths=[4])
    get_verifier("exact").prepare(model, DIGITS_SHAPE)
    assert next(model.parameters()).dtype == torch.float32
