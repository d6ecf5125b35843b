"""Loss fusion: the exact form gives the unfused CROWN-IBP margins, loss and gradients (to
rounding) on random networks with 10 and 200 classes, in the recipe as well; auto_LiRPA's
fused bound is sound but a different (here looser) loss, equal only where it reduces to IBP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certbench.models import build_model
from certbench.training.loss_fusion import crown_ibp_margins, lirpa_fused_ce, robust_ce
from certbench.training.recipes import make_loss, recipe_args
from certbench.verifiers.bound_propagation import Ball, BoundPropagator, TracedNetwork
from conftest import DIGITS_SHAPE


def _network(arch: str, classes: int, seed: int = 0):
    torch.manual_seed(seed)
    args = {"widths": [32, 32]} if arch == "mlp" else {}
    model = build_model(arch, DIGITS_SHAPE, classes, (0.3,), (0.4,), args)
    return model, BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))


def _batch(classes: int, n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *DIGITS_SHAPE, generator=g), torch.randint(0, classes, (n,),
                                                                     generator=g)


CASES = [("mlp", 10, "inf", 0.03), ("mlp", 200, "inf", 0.03), ("mlp", 10, "2", 0.4),
         ("cnn-small", 10, "inf", 0.02), ("cnn-small", 200, "2", 0.3)]


@pytest.mark.parametrize(("arch", "classes", "norm", "eps"), CASES)
def test_exact_fusion_gives_the_unfused_margins_loss_and_gradients(arch, classes, norm, eps):
    model, prop = _network(arch, classes)
    x, y = _batch(classes)
    ball = Ball(x, eps, norm)
    results = {}
    for fusion in ("none", "exact"):
        ibp, crown_ibp = crown_ibp_margins(prop, ball, y, classes, True, fusion)
        loss = 0.3 * robust_ce(ibp, y) + 0.7 * robust_ce(crown_ibp, y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[fusion] = ibp, crown_ibp, loss, grads
    (ibp0, crown0, loss0, grads0), (ibp1, crown1, loss1, grads1) = results["none"], results[
        "exact"]
    assert (crown0 > ibp0 + 1e-3).any()  # the two bounds differ: both parts are checked
    torch.testing.assert_close(ibp1, ibp0, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(crown1, crown0, rtol=1e-6, atol=1e-5)
    assert abs(loss1.item() - loss0.item()) <= 1e-6 * abs(loss0.item())
    for a, b in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_crown_ibp_recipe_loss_is_unchanged_by_fusion(digits):
    model, prop = _network("mlp", 10, seed=3)
    x, y = digits.x_train[:64], digits.y_train[:64]
    losses = {}
    for fusion in ("none", "exact"):
        args = recipe_args("crown-ibp", {"epochs": 10, "eps": 0.1, "fusion": fusion})
        loss_fn = make_loss("crown-ibp", args, None, prop)
        losses[fusion] = [loss_fn(model, x, y, p).item() for p in (0.0, 1.5, 3.0, 7.0)]
    for a, b in zip(losses["exact"], losses["none"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b)


def _worst_sampled_ce(model, x, y, eps, draws=64):
    g = torch.Generator().manual_seed(1)
    worst = torch.full((len(y),), -float("inf"))
    with torch.no_grad():
        for _ in range(draws):
            noise = (2 * torch.rand(x.shape, generator=g) - 1) * eps
            ce = F.cross_entropy(model((x + noise).clamp(0, 1)), y, reduction="none")
            worst = torch.maximum(worst, ce)
    return worst


@pytest.mark.parametrize("classes", [10, 200])
def test_lirpa_fusion_is_a_sound_bound_of_the_loss_but_not_the_unfused_one(classes):
    model, prop = _network("mlp", classes, seed=1)
    x, y = _batch(classes, seed=1)
    eps = 0.03
    ball = Ball(x, eps, "inf")
    ibp, crown_ibp = crown_ibp_margins(prop, ball, y, classes, True, "none")
    with torch.no_grad():
        fused = lirpa_fused_ce(prop, ball, y, classes, beta=1.0, reduction="none")
        fused_ibp = lirpa_fused_ce(prop, ball, y, classes, beta=0.0, reduction="none")
        unfused = F.cross_entropy(-crown_ibp, y, reduction="none")
        unfused_ibp = F.cross_entropy(-ibp, y, reduction="none")
    sampled = _worst_sampled_ce(model, x, y, eps)
    assert (fused >= sampled - 1e-5).all()  # an upper bound of the worst-case loss
    torch.testing.assert_close(fused_ibp, unfused_ibp, rtol=1e-6, atol=1e-6)
    gap = (fused - unfused) / unfused
    assert gap.abs().max() > 1e-3  # not the unfused CROWN-IBP loss
    assert gap.mean() > 0  # looser on average on these networks


def test_a_network_without_a_dense_head_falls_back_to_the_unfused_bounds():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10), torch.nn.Tanh())
    prop = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    x, y = _batch(10, n=4)
    ball = Ball(x, 0.01, "inf")
    a = crown_ibp_margins(prop, ball, y, 10, True, "none")
    b = crown_ibp_margins(prop, ball, y, 10, True, "exact")
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="dense last layer"):
        lirpa_fused_ce(prop, ball, y, 10, 1.0)
