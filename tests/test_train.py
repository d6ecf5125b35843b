"""Training recipes: GloRo's bottom logit and LMT's margin factor by hand, LMT's pairwise
loss scoring exactly the points the GloRo bound certifies, resumption that reproduces an
uninterrupted run, the TRADES variant, and power-iteration estimates kept apart from the
sound bound."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors import safe_open

from certbench.errors import UserError
from certbench.matrix import ModelSpec
from certbench.run.provision import model_stem
from certbench.training import resume
from certbench.training.recipes import (
    NAMING_NEUTRAL,
    RECIPES,
    gloro_logits,
    make_loss,
    margin_factor,
    ramp,
    recipe_args,
)
from certbench.training.train import lr_scheduler, train_model
from certbench.verifiers import get_verifier
from certbench.verifiers.global_lipschitz import LipschitzGraph
from certbench.verifiers.operator_norms import power_iteration_estimate
from conftest import DIGITS_SHAPE, interrupt_training, random_model


def test_gloro_bottom_logit_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]])
    k = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]])
    out = gloro_logits(logits, k, eps=0.5)
    # sample 0: j = 0, bottom = max(1 + 0.5 * 2, 0 + 0.5 * 4) = 2
    # sample 1: j = 1, bottom = max(0 + 0.5 * 2, 1.5 + 0.5 * 1) = 2
    torch.testing.assert_close(out[:, -1], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(out[:, :-1], logits)


def test_lmt_margin_factor_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]])
    addition = torch.tensor([[0.0, 1.0, 4.0], [0.0, 1.0, 1.0]])
    y = torch.tensor([0, 0])
    # sample 0: gaps 0, 2, 3 -> ratios 1, 1 (2 >= 1), 3 / 4; sample 1 is misclassified -> 0
    torch.testing.assert_close(margin_factor(logits, addition, y), torch.tensor([[0.75], [0.0]]))


def test_lmt_pairwise_loss_scores_exactly_what_the_gloro_bound_certifies():
    """logits + c * K[y] has its maximum at y iff f_y - f_i > c * K_yi for every i: the
    point is classified y and certified at radius c by the GloRo bound, the verifier's."""
    model = random_model("cnn-small", seed=3)
    graph = LipschitzGraph(model, DIGITS_SHAPE)
    gloro = get_verifier("global-lipschitz", bound="gloro")
    gloro.prepare(model, DIGITS_SHAPE)
    x = torch.rand(200, *DIGITS_SHAPE)
    with torch.no_grad():
        y = model(x).argmax(1)
        y[::3] = (y[::3] + 1) % 10  # some points misclassified
        logits = model(x)
    radius = gloro.certify(x, "2", [0.0]).radius
    middle = radius[radius > 0].sort().values[radius.gt(0).sum() // 2 - 1:][:2]
    c = float(middle.mean())  # half the correct points certified at c, none on the boundary
    args = recipe_args("lmt", {"c": c, "ramp_epochs": 0, "margin": "pairwise"})
    with torch.no_grad():
        lifted = logits + c * graph.bounds(torch.float32).pairwise()[y]
        loss = make_loss("lmt", args, graph)(model, x, y, 1.0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(lifted, y))
    cert = gloro.certify(x, "2", [c])
    certified = (cert.prediction == y) & (cert.radius >= c)
    scored = lifted.argmax(1) == y
    assert 0 < int(certified.sum()) < int((cert.prediction == y).sum())  # both kinds present
    assert torch.equal(scored, certified)


def test_lmt_scaled_pairwise_loss_lifts_by_the_certified_share_of_c():
    """With the pairwise addition c * K[y], min_{i != y} (f_y - f_i) / (c K_yi) is r / c
    for the GloRo radius r: the loss is CE(f + min(1, r / c) c K[y]) on correct points and
    plain CE on the others."""
    model = random_model("cnn-small", seed=4)
    with torch.no_grad():  # confident logits, so that the lift moves the loss
        model[-1].weight.mul_(30.0)
        model[-1].bias.mul_(30.0)
    graph = LipschitzGraph(model, DIGITS_SHAPE)
    gloro = get_verifier("global-lipschitz", bound="gloro")
    gloro.prepare(model, DIGITS_SHAPE)
    x = torch.rand(100, *DIGITS_SHAPE)
    with torch.no_grad():
        logits = model(x)
        y = logits.argmax(1)
        y[::4] = (y[::4] + 1) % 10
        radius = gloro.certify(x, "2", [0.0]).radius.to(logits.dtype)
        c = float(radius[radius > 0].median())
        args = recipe_args("lmt", {"c": c, "ramp_epochs": 0, "margin": "pairwise",
                                   "scale_by_margin": True})
        loss = make_loss("lmt", args, graph)(model, x, y, 1.0)
        correct = logits.argmax(1) == y
        share = torch.where(correct, (radius / c).clamp(max=1.0), 0.0)
        others = 1.0 - torch.nn.functional.one_hot(y, 10).to(logits.dtype)
        pairwise = graph.bounds(torch.float32).pairwise()[y] * others
        expected = torch.nn.functional.cross_entropy(logits + share[:, None] * c * pairwise, y)
        plain = torch.nn.functional.cross_entropy(logits, y)
    assert 0 < int((share[correct] < 1).sum()) < int(correct.sum())  # both kinds present
    # the verifier's radius subtracts a floating-point slack from each margin
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0.0)
    assert float(expected) > float(plain) * 1.05  # the lift is not lost in the tolerance


def test_lmt_scaled_addition_leaves_misclassified_points_plain_cross_entropy():
    model = random_model("mlp", widths=[32])
    graph = LipschitzGraph(model, DIGITS_SHAPE)
    x = torch.rand(64, *DIGITS_SHAPE)
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 10  # every point misclassified
    args = recipe_args("lmt", {"c": 1.0, "ramp_epochs": 0, "scale_by_margin": True})
    loss = make_loss("lmt", args, graph)(model, x, y, 1.0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("args", [
    {"epochs": 3, "eps": 0.3},
    # power-iteration estimates: the kept vectors travel in the resume point
    {"epochs": 3, "eps": 0.3, "lipschitz": "power", "power_steps": 2},
], ids=["exact", "power"])
def test_training_resumes_from_the_last_finished_epoch(digits, tmp_path, monkeypatch, args):
    full, full_card = train_model(tmp_path / "full", digits, "mlp", {"widths": [16]}, "gloro", args,
                          progress=False)
    # in the middle of the third epoch
    interrupt_training(monkeypatch, 2 * math.ceil(len(digits.y_train) / 128) + 2)
    with pytest.raises(KeyboardInterrupt):
        train_model(tmp_path / "resumed", digits, "mlp", {"widths": [16]}, "gloro", args,
                    progress=False)
    point = tmp_path / "resumed.resume.safetensors"
    with safe_open(str(point), framework="pt") as found:
        assert found.metadata()["epoch"] == "2"
        # the committable resume point holds the weights and the data order, no optimiser
        vectors = {k for k in found.keys() if k.startswith("power.")}
        assert set(found.keys()) - vectors == {"generator"} | {f"model.{k}"
                                                               for k in full.state_dict()}
        assert len(vectors) == (2 if "lipschitz" in args else 0)  # the mlp's two dense layers
    assert not (tmp_path / "resumed.safetensors").exists()
    # a fresh clone: the committed resume point without Adam's moments
    shutil.copy(point, tmp_path / "clone.resume.safetensors")
    monkeypatch.undo()
    resumed, card = train_model(tmp_path / "resumed", digits, "mlp", {"widths": [16]}, "gloro",
                                args, progress=False)
    assert not point.exists() and not (tmp_path / "resumed.optimizer.pt").exists()
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert card["recipe_args"]["eps"] == 0.3 and card["clean_acc"] == full_card["clean_acc"]
    with pytest.warns(UserWarning, match="without Adam's moments"):
        clone, clone_card = train_model(tmp_path / "clone", digits, "mlp", {"widths": [16]},
                                        "gloro", args, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(),
                                                      clone.state_dict().values(), strict=True))
    assert abs(clone_card["clean_acc"] - full_card["clean_acc"]) < 0.1


def test_a_resume_point_without_moments_restores_the_scheduled_learning_rate(tmp_path):
    """Resuming after epoch 3 of 4 on GloRo's hold-decay schedule: Adam restarts at the
    decayed rate, not at ``lr``; moments from another epoch are not used either."""
    hp = recipe_args("gloro", {"epochs": 4, "lr": 1e-3, "lr_schedule": "hold-decay",
                               "lr_end": 1e-5})

    def fresh():
        torch.manual_seed(0)
        model = random_model("mlp", widths=[8])
        optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"])
        return model, optimizer, lr_scheduler(optimizer, hp, 4), torch.Generator().manual_seed(1)

    weights = tmp_path / "net.safetensors"
    model, optimizer, scheduler, generator = fresh()
    for _ in range(3):
        model(torch.rand(4, *DIGITS_SHAPE)).sum().backward()
        optimizer.step()
        scheduler.step()
    torch.randperm(10, generator=generator)
    resume.save(weights, model, optimizer, scheduler, generator, 3, 12.5, hp)
    expected_lr = optimizer.param_groups[0]["lr"]
    assert expected_lr < hp["lr"] / 5
    moments = torch.load(tmp_path / "net.optimizer.pt", weights_only=True)
    torch.save({**moments, "epoch": 2}, tmp_path / "net.optimizer.pt")
    restored, optimizer2, scheduler2, generator2 = fresh()
    with pytest.warns(UserWarning, match="from another epoch"):
        assert resume.load(weights, restored, optimizer2, scheduler2, generator2, hp) == (3, 12.5)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(expected_lr)
    assert not optimizer2.state  # the moments restart from zero
    assert torch.equal(generator2.get_state(), generator.get_state())
    for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="other hyperparameters"):
        resume.load(weights, *fresh(), {**hp, "epochs": 5})
    # saved before `power_steps` existed: it counts at its default, and only there
    power = {**hp, "lipschitz": "power"}
    older = {k: v for k, v in power.items() if k != "power_steps"}
    resume.save(weights, model, optimizer, scheduler, generator, 3, 12.5, older)
    vectors: dict[int, torch.Tensor] = {}
    with pytest.warns(UserWarning, match="without the power iteration's vectors"):
        assert resume.load(weights, *fresh(), power, vectors) == (3, 12.5)
    assert not vectors
    with pytest.raises(UserError, match="other hyperparameters"):
        resume.load(weights, *fresh(), {**power, "power_steps": 10})


def test_trades_variant_trains(digits, tmp_path):
    model, card = train_model(tmp_path / "t", digits, "mlp", {"widths": [32]}, "gloro",
                              {"epochs": 4, "eps": 0.3, "trades_lambda": 1.0}, progress=False)
    assert card["clean_acc"] > 0.6


def test_unknown_recipe_arguments_are_refused():
    with pytest.raises(UserError, match="no argument"):
        recipe_args("gloro", {"epsilon": 0.3})
    with pytest.raises(UserError, match="lipschitz must be"):
        recipe_args("lmt", {"lipschitz": "guess"})
    with pytest.raises(UserError, match="margin must be"):
        recipe_args("lmt", {"margin": "class"})


@pytest.mark.parametrize("power_steps", [1, 10])
@pytest.mark.parametrize("arch", ["mlp", "cnn-small", "resnet-tiny"])
def test_power_iteration_estimates_approach_the_bound_from_below(arch, power_steps):
    model = random_model(arch)
    exact = LipschitzGraph(model, DIGITS_SHAPE).bounds().network.item()
    graph = LipschitzGraph(model, DIGITS_SHAPE, power_iteration=True, power_steps=power_steps)
    estimates = [graph.bounds(torch.float32).network.item() for _ in range(200)]
    assert max(estimates) <= exact * (1 + 1e-5)
    # the estimate gets close; the gap left is the circular-convolution bound's slack at
    # the borders, largest on these 8x8 inputs (see test_operator_norms)
    assert estimates[-1] >= 0.7 * exact


def _top_singular_value(weight, u0, steps, differentiate):
    return power_iteration_estimate(lambda u: u @ weight.T, u0, steps, differentiate)[0]


@pytest.mark.parametrize("differentiate", [False, True])
def test_power_iteration_gradient_is_that_of_the_function_it_computes(differentiate):
    """Differentiated through, the gradient is the finite-difference gradient of the whole
    map W -> estimate(W, u0) (the steps move with W); not differentiated, it is that of
    ||W u|| with the last step's u held fixed, which differs while u0 is far from the top
    singular vector. At the top singular vector both give u1 v1^T."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    u0 = torch.randn(1, 5, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad(_top_singular_value(weight, u0, 3, differentiate), weight)
    numeric = torch.zeros_like(weight)
    with torch.no_grad():
        for index in range(weight.numel()):
            step = torch.zeros_like(weight).view(-1)
            step[index] = 1e-6
            step = step.view_as(weight)
            with torch.enable_grad():
                up = _top_singular_value(weight + step, u0, 3, differentiate)
                down = _top_singular_value(weight - step, u0, 3, differentiate)
            numeric.view(-1)[index] = (up - down) / 2e-6
    assert torch.allclose(grad, numeric, atol=1e-6) == differentiate

    left, _, right = torch.linalg.svd(weight.detach())
    top = right[:1]
    (at_top,) = torch.autograd.grad(_top_singular_value(weight, top, 3, differentiate), weight)
    assert torch.allclose(at_top.abs(), torch.outer(left[:, 0], right[0]).abs(), atol=1e-8)


@pytest.mark.parametrize("gradient", ["steps", "final"])
def test_the_graph_trains_through_its_power_steps(digits, tmp_path, gradient):
    """From a kept vector far from the top singular vector, a graph with
    ``power_steps = 3`` gives the gradient of 3 steps differentiated through
    (``power_gradient = "steps"``, GloRo's paper snapshot) or that of 3 undifferentiated
    ones (``"final"``, GloRo's library), not the other; and a recipe with
    ``power_steps`` trains."""
    dense = torch.nn.Linear(64, 10)
    graph = LipschitzGraph(torch.nn.Sequential(torch.nn.Flatten(), dense), DIGITS_SHAPE,
                           power_iteration=True, power_steps=3, power_gradient=gradient)
    graph.bounds(torch.float32)  # the first call: 30 steps from the seeded vector
    (index,) = graph.vectors
    start = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    graph.vectors[index] = start
    (trained,) = torch.autograd.grad(graph.bounds(torch.float32).network, dense.weight)
    by_hand = {
        through: torch.autograd.grad(_top_singular_value(dense.weight, start, 3, through),
                                     dense.weight)[0]
        for through in (True, False)
    }
    through = gradient == "steps"
    assert torch.allclose(trained, by_hand[through], atol=1e-6)
    assert not torch.allclose(trained, by_hand[not through], atol=1e-3)
    _, card = train_model(tmp_path / "p", digits, "mlp", {"widths": [16]}, "gloro",
                          {"epochs": 1, "eps": 0.3, "lipschitz": "power", "power_steps": 2,
                           "power_gradient": gradient}, progress=False)
    assert card["recipe_args"]["power_steps"] == 2
    assert card["recipe_args"]["power_gradient"] == gradient


def test_converge_reaches_the_exact_norm_of_a_dense_network():
    """On dense layers the exact bound is the product of SVD norms (ReLU: 1), so kept
    vectors run to convergence must give it; one step from vectors far from the top
    singular vectors (random ones here) gives less."""
    model = random_model("mlp")
    exact = LipschitzGraph(model, DIGITS_SHAPE).bounds().network.item()
    graph = LipschitzGraph(model, DIGITS_SHAPE, power_iteration=True)
    graph.bounds()  # the first call keeps a vector per layer
    generator = torch.Generator().manual_seed(0)
    for index, vector in graph.vectors.items():
        graph.vectors[index] = torch.randn(vector.shape, generator=generator)
    lagging = graph.bounds().network.item()
    assert lagging < 0.99 * exact
    converged = graph.converge(tolerance=1e-6)
    assert converged == pytest.approx(exact, rel=1e-4)
    assert graph.bounds().network.item() == pytest.approx(exact, rel=1e-4)
    with pytest.raises(ValueError, match="power_iteration=True only"):
        LipschitzGraph(model, DIGITS_SHAPE).converge()


def test_power_converge_runs_before_training_and_after_every_epoch(digits, tmp_path,
                                                                   monkeypatch):
    calls = []
    original = LipschitzGraph.converge
    monkeypatch.setattr(LipschitzGraph, "converge",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    train_model(tmp_path / "c", digits, "mlp", {"widths": [16]}, "gloro",
                {"epochs": 2, "eps": 0.3, "lipschitz": "power", "power_steps": 5,
                 "power_gradient": "final", "power_converge": True}, progress=False)
    assert len(calls) == 3
    train_model(tmp_path / "n", digits, "mlp", {"widths": [16]}, "gloro",
                {"epochs": 1, "eps": 0.3, "lipschitz": "power"}, progress=False)
    assert len(calls) == 3


def test_power_steps_apply_to_power_estimates_only():
    assert recipe_args("gloro", {"lipschitz": "power", "power_steps": 10})["power_steps"] == 10
    with pytest.raises(UserError, match="lipschitz = 'power' only"):
        recipe_args("gloro", {"power_steps": 10})
    for bad in (0, 2.5, True):
        with pytest.raises(UserError, match="power_steps must be"):
            recipe_args("lmt", {"lipschitz": "power", "power_steps": bad})
    with pytest.raises(UserError, match="power_gradient must be"):
        recipe_args("gloro", {"lipschitz": "power", "power_gradient": "last"})
    with pytest.raises(UserError, match="power_converge must be"):
        recipe_args("gloro", {"lipschitz": "power", "power_converge": 1})
    with pytest.raises(UserError, match="lipschitz = 'power' only"):
        recipe_args("lmt", {"power_converge": True})


def test_arguments_at_their_naming_neutral_defaults_keep_a_checkpoint_name(tmp_path):
    """A checkpoint trained before an argument existed keeps its name while the argument
    holds the value that trains as before (`NAMING_NEUTRAL`); any other value renames."""
    base = {"eps": 1.75, "lipschitz": "power"}
    stem = model_stem(ModelSpec(name="m", arch="mlp", recipe="gloro", recipe_args=base),
                      "mnist", tmp_path)
    for key, value in NAMING_NEUTRAL.items():
        if key not in RECIPES["gloro"].defaults:
            continue
        spec = ModelSpec(name="m", arch="mlp", recipe="gloro", recipe_args={**base, key: value})
        assert model_stem(spec, "mnist", tmp_path) == stem, key
    renamed = ModelSpec(name="m", arch="mlp", recipe="gloro",
                        recipe_args={**base, "power_steps": 10})
    assert model_stem(renamed, "mnist", tmp_path) != stem


def test_ibp_and_crown_ibp_training_certify_far_more_than_standard(digits, tmp_path):
    """At l_inf eps 0.1 on digits a standard MLP keeps nothing IBP-certified; the IBP- and
    CROWN-IBP-trained ones keep a large share (CROWN bounds on all three)."""
    from certbench.verifiers import get_verifier

    certified = {}
    for recipe in ("standard", "ibp", "crown-ibp"):
        args = {"epochs": 30} if recipe == "standard" else {"epochs": 30, "eps": 0.1}
        model, _ = train_model(tmp_path / recipe, digits, "mlp", {"widths": [64, 64]}, recipe,
                               args, progress=False)
        verifier = get_verifier("crown")
        verifier.prepare(model, DIGITS_SHAPE)
        cert = verifier.certify(digits.x_test, "inf", [0.1])
        ok = (cert.prediction == digits.y_test) & (cert.verdicts[:, 0] == 0)
        certified[recipe] = ok.float().mean().item()
    assert certified["ibp"] > certified["standard"] + 0.2
    assert certified["crown-ibp"] > certified["standard"] + 0.2


def test_hold_decay_schedule_holds_then_decays_geometrically():
    hp = recipe_args("gloro", {"epochs": 10, "lr": 1e-3, "lr_schedule": "hold-decay",
                               "lr_end": 1e-6})
    rates = _rates(hp, hp["epochs"] + 1)
    assert rates[:6] == [1e-3] * 6  # held through the first half
    assert rates[10] == pytest.approx(1e-6)  # lr_end at the last epoch
    ratios = [b / a for a, b in zip(rates[5:10], rates[6:11], strict=True)]
    assert ratios == pytest.approx([ratios[0]] * 5)  # geometric: one factor per epoch
    with pytest.raises(UserError, match="0 < lr_end < lr"):
        recipe_args("gloro", {"lr_schedule": "hold-decay"})
    with pytest.raises(UserError, match="lr_schedule must be"):
        recipe_args("lmt", {"lr_schedule": "linear"})


def test_exponential_schedule_decays_geometrically_from_the_first_epoch():
    """GloRo's library: lr to lr_end by one factor an epoch, from epoch 0."""
    hp = recipe_args("gloro", {"epochs": 10, "lr": 1e-3, "lr_schedule": "exponential",
                               "lr_end": 1e-6})
    rates = _rates(hp, hp["epochs"] + 1)
    assert rates[0] == 1e-3 and rates[10] == pytest.approx(1e-6)
    factors = [b / a for a, b in zip(rates[:-1], rates[1:], strict=True)]
    assert factors == pytest.approx([10 ** -0.3] * 10)
    with pytest.raises(UserError, match="0 < lr_end < lr"):
        recipe_args("gloro", {"lr_schedule": "exponential"})


def test_log_ramp_starts_at_a_hundredth_and_rises_steeply_then_slowly():
    """GloRo's library's log schedule: log((e^v - e^s) t + e^s) from s = v / 100, reaching
    v at the ramp's end and holding it, concave (its slope falls by e^(v - s))."""
    v, epochs = 1.738, 150
    values = [ramp(v, epochs, p, "log") for p in range(0, 201)]
    assert values[0] == pytest.approx(v / 100)
    assert values[150:] == [v] * 51
    assert values[149] == pytest.approx(v, rel=1e-2)  # continuous at the ramp's end
    steps = [b - a for a, b in zip(values[:150], values[1:151], strict=True)]
    assert all(step > 0 for step in steps) and steps[0] > 5 * steps[-1]  # concave
    assert values[15] > 2 * ramp(v, epochs, 15)  # above the linear ramp early on
    with pytest.raises(UserError, match="ramp_shape"):
        recipe_args("gloro", {"ramp_shape": "cosine"})


def test_constant_schedule_keeps_the_rate():
    hp = recipe_args("lmt", {"epochs": 5, "lr": 1e-3, "lr_schedule": "constant"})
    rates = _rates(hp, hp["epochs"])
    assert rates == [1e-3] * 5


def test_multistep_schedule_and_warmup(digits, tmp_path):
    """CROWN-IBP's schedule: lr times gamma at each milestone; before ``warmup_epochs``
    the bound recipes train on plain cross-entropy (no bound is computed)."""
    from certbench.training.recipes import make_loss
    hp = recipe_args("crown-ibp", {"epochs": 6, "lr": 1e-3, "lr_schedule": "multistep",
                                   "lr_milestones": [2, 4], "lr_gamma": 0.5,
                                   "warmup_epochs": 1, "ramp_epochs": 2})
    rates = _rates(hp, hp["epochs"])
    assert rates == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    with pytest.raises(UserError, match="lr_milestones"):
        recipe_args("crown-ibp", {"lr_schedule": "multistep", "lr_milestones": [30, 10]})

    class NoBounds:
        def lower_bound(self, *args):
            raise AssertionError("a bound during warm-up")

    from conftest import random_model

    model = random_model("mlp", widths=[16])
    x, y = digits.x_train[:8], digits.y_train[:8]
    loss = make_loss("crown-ibp", hp, None, NoBounds())
    expected = torch.nn.functional.cross_entropy(model(x), y)
    torch.testing.assert_close(loss(model, x, y, 0.5), expected)


def _rates(hp, epochs):
    """The learning rate the recipe's schedule gives at each of ``epochs`` epochs."""
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=hp["lr"])
    scheduler = lr_scheduler(optimizer, hp, hp["epochs"])
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates
