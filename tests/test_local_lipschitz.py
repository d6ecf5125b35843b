"""Local Lipschitz bounds: the gradient box contains every sampled gradient, the bound is
exact on a linear model, never below the sampled estimate, the radius is never below the
global one, and PGD finds nothing inside a certified radius."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certbench.run.attacks import pgd
from certbench.verifiers import get_verifier
from certbench.verifiers.bound_propagation import Ball
from certbench.verifiers.bound_propagation.verifier import margin_spec
from certbench.verifiers.local_lipschitz import gradient_interval
from conftest import DIGITS_SHAPE, RANDOM_MODELS, random_model

NORMS = ("2", "inf")
EPS = {"2": [0.05, 0.2], "inf": [0.005, 0.02]}


def _prepared(model):
    verifier = get_verifier("local-lipschitz", estimate_points=16, estimate_steps=3)
    verifier.prepare(model, DIGITS_SHAPE)
    return verifier


@pytest.mark.parametrize("arch", ["mlp", "cnn-small", "resnet-tiny"])
@pytest.mark.parametrize("norm", NORMS)
def test_gradient_box_contains_sampled_gradients(digits, arch, norm):
    model = random_model(arch, **RANDOM_MODELS[arch])
    verifier = _prepared(model)
    x = digits.x_test[:4]
    eps = EPS[norm][1]
    with torch.no_grad():
        prediction = model(x).argmax(1)
    spec = margin_spec(prediction, 10)
    bounds = verifier.propagator.intermediate_bounds(Ball(x, eps, norm), "crown")
    lower, upper = gradient_interval(verifier.propagator, spec, bounds)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        if norm == "inf":
            delta = (2 * torch.rand(x.shape, generator=gen) - 1) * eps
        else:
            delta = torch.randn(x.shape, generator=gen)
            delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(1)
        point = (x + delta).clamp(0, 1).requires_grad_(True)
        margins = (spec @ model(point)[:, :, None])[..., 0]  # (batch, rows)
        for r in range(margins.shape[1]):
            (grad,) = torch.autograd.grad(margins[:, r].sum(), point, retain_graph=True)
            assert (grad >= lower[:, r] - 1e-5).all() and (grad <= upper[:, r] + 1e-5).all()


def test_linear_model_gets_its_exact_constant_and_radius(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    verifier = _prepared(model)
    x = digits.x_test[:8]
    cert = verifier.certify(x, "2", [0.1])
    with torch.no_grad():
        logits = model(x).double()
    w = model[1].weight.double()
    prediction = logits.argmax(1)
    diff = w[prediction][:, None, :] - w[None]  # (n, classes, d)
    norms = diff.norm(dim=2)
    margins = logits.gather(1, prediction[:, None]) - logits
    ratio = torch.where(norms > 0, margins / norms.clamp(min=1e-12), torch.inf)
    exact_radius = ratio.min(dim=1).values
    exact_lip = norms.max(dim=1).values
    assert torch.allclose(cert.columns["lipschitz_bound"][:, 0], exact_lip, rtol=2e-4)
    estimate = verifier.diagnostics(x, "2", [0.1])["lipschitz_estimate"]
    assert torch.allclose(estimate[:, 0], exact_lip, rtol=1e-4)
    assert (cert.radius <= exact_radius).all()
    assert torch.allclose(cert.radius, exact_radius, atol=2e-3)


def test_certification_does_not_run_the_estimate(digits, monkeypatch):
    """The estimate is a diagnostic (`Diagnosed`): certify never pays for it, and
    ``estimate_points = 0`` gives no column at all."""
    model = random_model("mlp", **RANDOM_MODELS["mlp"])
    verifier = _prepared(model)

    def forbidden(*args, **kwargs):
        raise AssertionError("certify ran the estimate")

    with monkeypatch.context() as patched:
        patched.setattr(type(verifier), "estimate", forbidden)
        cert = verifier.certify(digits.x_test[:4], "2", [0.1])
    assert "lipschitz_estimate" not in cert.columns
    off = get_verifier("local-lipschitz", estimate_points=0)
    off.prepare(model, DIGITS_SHAPE)
    assert off.diagnostics(digits.x_test[:4], "2", [0.1]) == {}


@pytest.mark.parametrize("name", ["mlp-gloro", "cnn-small-gloro", "mlp-standard"])
@pytest.mark.parametrize("norm", NORMS)
def test_trained_models_bound_estimate_global_and_pgd(trained, digits, name, norm):
    model = trained[name]
    verifier = _prepared(model)
    x = digits.x_test[:40]
    cert = verifier.certify(x, norm, EPS[norm])
    estimate = verifier.diagnostics(x, norm, EPS[norm])["lipschitz_estimate"]
    assert (cert.columns["lipschitz_bound"] >= estimate).all()
    global_verifier = get_verifier("global-lipschitz")
    global_verifier.prepare(model, DIGITS_SHAPE)
    global_radius = global_verifier.certify(x, norm, EPS[norm]).radius
    assert (cert.radius >= global_radius).all()
    certified = cert.radius > 0
    assert certified.sum() > 0
    points, success = pgd(model, x[certified], cert.prediction[certified],
                          cert.radius[certified].float() * 0.999, norm, steps=50, restarts=3)
    assert not success.any()
    # and the attack is not idle: at twice the radius it does flip some points
    _, success_far = pgd(model, x[certified], cert.prediction[certified],
                         cert.radius[certified].float() * 4, norm, steps=50, restarts=3)
    assert success_far.any()


@pytest.mark.parametrize("arch", ["mlp", "cnn-small", "resnet-tiny"])
def test_random_models_no_attack_inside_the_radius(digits, arch):
    model = random_model(arch, **RANDOM_MODELS[arch])
    verifier = _prepared(model)
    x = digits.x_test[:12]
    for norm in NORMS:
        cert = verifier.certify(x, norm, EPS[norm])
        estimate = verifier.diagnostics(x, norm, EPS[norm])["lipschitz_estimate"]
        assert (cert.columns["lipschitz_bound"] >= estimate).all()
        ok = cert.radius > 0
        _, success = pgd(model, x[ok], cert.prediction[ok], cert.radius[ok].float() * 0.999,
                         norm, steps=50, restarts=3)
        assert not success.any()
        for k, eps in enumerate(EPS[norm]):  # the per-epsilon verdicts, attacked at eps
            at_eps = cert.verdicts[:, k] == 0
            if at_eps.any():
                _, success = pgd(model, x[at_eps], cert.prediction[at_eps], eps, norm,
                                 steps=50, restarts=3)
                assert not success.any()
