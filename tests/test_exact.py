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


def test_exact_verdict_matches_a_dense_grid_in_two_dimensions():
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
    assert cert.columns["margin_lb"][0, 0] <= grid_min + 1e-6  # alpha-CROWN's bound holds
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
    for (n, k), point in truth.counterexamples.items():
        assert (point - x[n]).abs().max() <= eps[k] + 1e-6
        assert 0 <= point.min() and point.max() <= 1
        with torch.no_grad():
            assert model(point).argmax(1) != model(x[n : n + 1]).argmax(1)
    assert len(truth.counterexamples) == int((truth.verdicts == FALSIFIED).sum())


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


def test_find_point_is_a_feasibility_search_that_proves_absence():
    """On a 2-D network (the grid gives the true minimum of a margin): a bound above the
    minimum yields a point whose margin respects it; a bound below it is infeasible."""
    from certbench.verifiers.bound_propagation import Ball, BoundPropagator, TracedNetwork
    from certbench.verifiers.exact import MilpEncoding

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 3)).double().eval()
    net = TracedNetwork(model, (2,))
    ball = Ball(torch.tensor([[0.5, 0.4]], dtype=torch.float64), 0.2, "inf")
    with torch.no_grad():
        bounds = BoundPropagator(net).intermediate_bounds(ball, "crown")
    relu = {i: (lo[0].numpy(), hi[0].numpy()) for i, (lo, hi) in bounds.items()}
    lower, upper = (t[0].numpy() for t in ball.box())
    program = MilpEncoding(net, lower, upper, relu)
    m, c = program.output
    row = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64).numpy()
    axis = torch.linspace(0, 1, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    grid = torch.from_numpy(lower) + grid * torch.from_numpy(upper - lower)
    with torch.no_grad():
        true_min = float((model(grid) @ torch.from_numpy(row)).min())
    status, x = program.find_point((row @ m)[None], [float(row @ c)], true_min + 0.05, 30)
    assert status == "found"
    with torch.no_grad():
        value = float(model(torch.from_numpy(x[:2])[None]) @ torch.from_numpy(row))
    assert value <= true_min + 0.05 + 1e-6
    status, x = program.find_point((row @ m)[None], [float(row @ c)], true_min - 0.05, 30)
    assert (status, x) == ("none", None)


def test_exact_counterexamples_are_judged_by_the_model_in_its_own_precision():
    model = random_model("mlp", seed=11, widths=[16, 16])
    x = torch.rand(6, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(5))
    verifier = get_verifier("exact")
    verifier.prepare(model, DIGITS_SHAPE)
    cert = verifier.certify(x, "inf", [0.03])
    assert cert.counterexamples
    for (n, _), point in cert.counterexamples.items():
        assert point.dtype == torch.float32
        assert cert.columns["margin_min"][n, 0] <= 0
