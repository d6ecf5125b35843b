"""Gaussian Loss Smoothing: PGPE's estimate against closed forms (a quadratic's gradient, a
step's smoothed derivative), RGS against the plain gradient as sigma -> 0 and its blind
spot at a jump, parameters restored, the recipes resumable and refused when misconfigured."""

from __future__ import annotations

import math

import pytest
import torch

from certbench.errors import UserError
from certbench.training.gls import (
    Estimate,
    certified_loss,
    loss_along_direction,
    pgpe_gradient,
    rgs_gradient,
    surrogate,
)
from certbench.training.recipes import recipe_args
from certbench.training.train import train_model
from certbench.verifiers.bound_propagation import BoundPropagator, TracedNetwork
from conftest import DIGITS_SHAPE, interrupt_training, random_model


def _phi(t: float) -> float:
    return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def _cdf(t: float) -> float:
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def _replicates(estimator, loss, theta, sigma, per_estimate, count, seed=0):
    """``count`` independent estimates (each of ``per_estimate`` pairs or samples): their
    mean and its standard error, per coordinate."""
    generator = torch.Generator().manual_seed(seed)
    runs = torch.stack([estimator(lambda: loss(theta), [theta], sigma, per_estimate,
                                  generator).grads[0] for _ in range(count)])
    return runs.mean(0), runs.std(0) / math.sqrt(count)


def test_pgpe_estimate_matches_the_gradient_of_a_quadratic_within_its_standard_error():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    a = a @ a.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def quadratic(t):
        return 0.5 * t @ a @ t + b @ t

    true = (a @ theta + b).detach()
    mean, se = _replicates(pgpe_gradient, quadratic, theta, 0.1, 4, 500)
    assert se.max() < 0.1 * true.norm()  # precise enough to catch a wrong factor
    assert ((mean - true).abs() <= 4 * se).all(), (mean, true, se)
    one = pgpe_gradient(lambda: quadratic(theta), [theta], 0.1, 2000,
                        torch.Generator().manual_seed(1)).grads[0]
    assert ((one - true).abs() <= 4 * se * math.sqrt(500 * 4 / 2000)).all()


def test_pgpe_and_rgs_restore_the_parameters_bit_for_bit_even_when_the_loss_raises():
    model = random_model("mlp", widths=[16])
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.rand(4, *DIGITS_SHAPE)
    calls = [0]

    def failing():
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        return model(x).sum()

    params = list(model.parameters())
    for estimator in (pgpe_gradient, rgs_gradient):
        calls[0] = 0
        with pytest.raises(RuntimeError, match="boom"):
            estimator(failing, params, 0.1, 4, torch.Generator().manual_seed(0))
        for p, q in zip(model.parameters(), before, strict=True):
            assert torch.equal(p, q)
        estimator(lambda: model(x).sum(), params, 0.1, 2, torch.Generator().manual_seed(0))
        for p, q in zip(model.parameters(), before, strict=True):
            assert torch.equal(p, q)


def test_surrogate_has_the_estimates_value_and_gradient():
    p = torch.randn(3, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5])
    s = surrogate([p], Estimate([g], 1.25))
    s.backward()
    assert s.item() == 1.25
    torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("bound", ["ibp", "crown"])
def test_rgs_equals_the_plain_gradient_as_sigma_goes_to_zero(digits, bound):
    model = random_model("mlp", widths=[32, 32]).double()
    prop = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    x, y = digits.x_test[:32].double(), digits.y_test[:32]
    params = list(model.parameters())

    def loss():
        return certified_loss(model, prop, x, y, 0.02, 0.5, bound)[0]

    plain = torch.autograd.grad(loss(), params)
    errors = []
    for sigma in (1e-2, 1e-4, 1e-7):
        est = rgs_gradient(loss, params, sigma, 3, torch.Generator().manual_seed(0)).grads
        errors.append(max(((e - g).norm() / g.norm()).item()
                          for e, g in zip(est, plain, strict=True)))
    assert errors[-1] < 1e-5
    assert errors[0] > errors[-1]


def _step(theta):
    return (theta > 0).to(theta.dtype).sum() + 0.0 * theta.sum()  # gradient 0 a.e.


@pytest.mark.parametrize("t_over_sigma", [-1.3, 0.0, 0.6])
def test_on_a_jump_pgpe_follows_the_smoothed_derivative_and_rgs_sees_nothing(t_over_sigma):
    """d/dt E[step(t + sigma z)] = phi(t / sigma) / sigma. PGPE recovers it from loss values;
    RGS averages gradients, which are 0 on both sides of the jump: it returns exactly 0."""
    sigma = 0.2
    theta = torch.tensor([t_over_sigma * sigma], dtype=torch.float64, requires_grad=True)
    smoothed = _phi(t_over_sigma) / sigma
    mean, se = _replicates(pgpe_gradient, _step, theta, sigma, 8, 400)
    assert se.item() < 0.1 * smoothed
    assert abs(mean.item() - smoothed) <= 4 * se.item()
    rgs, _ = _replicates(rgs_gradient, _step, theta, sigma, 8, 20)
    assert rgs.item() == 0.0


@pytest.mark.parametrize("t_over_sigma", [-0.8, 0.3])
def test_on_a_steep_continuous_ramp_both_follow_the_smoothed_derivative(t_over_sigma):
    """A jump resolved into a ramp of width w = sigma / 4: RGS's exchange of gradient and
    expectation is valid again, and both estimators follow the closed form
    (Phi((t + w/2) / sigma) - Phi((t - w/2) / sigma)) / w."""
    sigma = 0.2
    w = sigma / 4
    theta = torch.tensor([t_over_sigma * sigma], dtype=torch.float64, requires_grad=True)

    def ramp(t):
        return ((t + w / 2) / w).clamp(0, 1).sum()

    t = t_over_sigma * sigma
    smoothed = (_cdf((t + w / 2) / sigma) - _cdf((t - w / 2) / sigma)) / w
    for estimator in (pgpe_gradient, rgs_gradient):
        mean, se = _replicates(estimator, ramp, theta, sigma, 8, 400)
        assert se.item() < 0.15 * smoothed, estimator.__name__
        assert abs(mean.item() - smoothed) <= 4 * se.item(), estimator.__name__


@pytest.mark.parametrize("recipe", ["gls-pgpe", "gls-rgs"])
def test_gls_training_resumes_to_the_same_weights(digits, tmp_path, monkeypatch, recipe):
    size = {"population": 2} if recipe == "gls-pgpe" else {"samples": 2}
    args = {"epochs": 2, "eps": 0.05, "bound": "ibp", "batch_size": 256, **size}
    arch = {"widths": [16]}
    full, card = train_model(tmp_path / "full", digits, "mlp", arch, recipe, args,
                             progress=False)
    interrupt_training(monkeypatch, math.ceil(len(digits.y_train) / 256) + 1)
    with pytest.raises(KeyboardInterrupt):
        train_model(tmp_path / "resumed", digits, "mlp", arch, recipe, args, progress=False)
    monkeypatch.undo()
    resumed, _ = train_model(tmp_path / "resumed", digits, "mlp", arch, recipe, args,
                             progress=False)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    initial = random_model("mlp", widths=[16])
    assert card["recipe_args"]["bound"] == "ibp"
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(),
                                                     initial.state_dict().values(), strict=True))


def test_gls_recipe_arguments_are_checked():
    assert recipe_args("gls-pgpe", {})["population"] >= 1
    with pytest.raises(UserError, match="bound must be"):
        recipe_args("gls-rgs", {"bound": "deeppoly"})
    with pytest.raises(UserError, match="population must be"):
        recipe_args("gls-pgpe", {"population": 0})
    with pytest.raises(UserError, match="no argument"):
        recipe_args("gls-rgs", {"population": 4})


def test_loss_along_a_direction_is_raw_at_zero_and_smoothed_by_noise(digits):
    model = random_model("mlp", widths=[16])
    prop = BoundPropagator(TracedNetwork(model, DIGITS_SHAPE))
    x, y = digits.x_test[:16], digits.y_test[:16]
    before = [p.detach().clone() for p in model.parameters()]
    curve = loss_along_direction(model, prop, x, y, 0.05, "crown", points=5, samples=3,
                                 sigma=0.05)
    at_zero = certified_loss(model, prop, x, y, 0.05, 0.0, "crown")[0].item()
    assert curve["t"][2] == 0.0
    assert curve["raw"][2] == pytest.approx(at_zero, rel=1e-5)
    assert curve["smoothed"][2] != pytest.approx(at_zero, rel=1e-6)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def _fake_results():
    import pandas as pd

    from certbench.report.view import ResultsView

    cells, certified = [], []
    models = {"grad-ibp": "ibp", "grad-crown": "crown", "pgpe-crown": "gls-pgpe",
              "mlp-standard": "standard"}
    for i, (model, recipe) in enumerate(models.items()):
        for j, verifier in enumerate(("ibp", "crown")):
            key = f"k{i}{j}"
            cells.append({"cell_key": key, "model": model, "recipe": recipe,
                          "verifier": verifier, "probabilistic": False, "status": "ok",
                          "clean_acc": 0.9, "matrix_file": "packaged: gls-paradox"})
            certified += [{"cell_key": key, "eps": e, "certified_acc": 0.5 - e - 0.1 * i}
                          for e in (0.02, 0.1)]
    return ResultsView.of(pd.DataFrame(cells), pd.DataFrame(certified))


def test_report_has_a_paradox_section_only_for_certified_training_recipes(tmp_path):
    import pandas as pd

    from certbench.report.build import gls_section, paradox_models

    results = _fake_results()
    kinds = paradox_models(results, None).set_index("model")
    assert kinds.loc["pgpe-crown", "optimiser"] == "PGPE"
    assert kinds.loc["pgpe-crown", "relaxation"] == "CROWN"  # from the packaged matrix
    assert kinds.loc["grad-ibp"].tolist() == ["GRAD", "IBP", 0]  # the matrix's seed
    assert "mlp-standard" not in kinds.index
    (tmp_path / "figures").mkdir()
    md, page = gls_section(results, None, tmp_path)
    assert "paradox of certified training" in md and (tmp_path / "figures" / "paradox.png").exists()
    assert "| PGPE" in md and "<img" in page
    training = pd.DataFrame([{"model": "grad-ibp", "recipe": "ibp", "optimiser": "GRAD",
                              "relaxation": "IBP", "train_time_s": 1.5, "clean_acc": 0.9},
                             {"model": "pgpe-crown", "recipe": "gls-pgpe", "optimiser": "PGPE",
                              "relaxation": "CROWN", "train_time_s": 60.0, "clean_acc": 0.2}])
    training.to_parquet(tmp_path / "training.parquet")
    md, _ = gls_section(results, tmp_path, tmp_path)
    assert "train_s" in md and "grad-crown" not in md  # the study's models only
    only_standard = results.cells[results.cells["recipe"] == "standard"]
    from certbench.report.view import ResultsView

    plain = ResultsView.of(only_standard, results.certified)
    assert gls_section(plain, None, tmp_path) == ("", "")


def test_report_pairs_seeds_for_tight_minus_ibp_and_draws_several_seeds(tmp_path):
    import pandas as pd

    from certbench.report.build import (
        gls_section,
        paper_sign,
        paradox_models,
        paradox_table,
        tight_minus_ibp,
    )
    from certbench.report.view import ResultsView

    # certified accuracy at eps 0.1 under CROWN: IBP-trained 0.30 / 0.40, CROWN-trained
    # 0.45 / 0.35 for seeds 0 / 1, so tight minus IBP is +0.15 and -0.05, mean +0.05
    accs = {("pgpe-ibp-s0", 0): 0.30, ("pgpe-ibp-s1", 1): 0.40,
            ("pgpe-crown-s0", 0): 0.45, ("pgpe-crown-s1", 1): 0.35,
            ("pgpe-crown-s2", 2): 0.50,  # no IBP twin for seed 2: not paired
            ("pgpe-ibp-s3", 3): 0.1, ("pgpe-ibp-s3-wide", 3): 0.2,
            ("pgpe-crown-s3", 3): 0.9}  # two IBP models of seed 3: ambiguous, not paired
    cells, certified, training = [], [], []
    for i, ((model, seed), acc) in enumerate(accs.items()):
        cells.append({"cell_key": f"k{i}", "model": model, "recipe": "gls-pgpe",
                      "verifier": "crown", "probabilistic": False, "status": "ok",
                      "clean_acc": 0.9})
        certified.append({"cell_key": f"k{i}", "eps": 0.1, "certified_acc": acc})
        training.append({"model": model, "recipe": "gls-pgpe", "optimiser": "PGPE",
                         "relaxation": "IBP" if "ibp" in model else "CROWN", "seed": seed,
                         "train_time_s": 1.0, "clean_acc": 0.9})
    results = ResultsView.of(pd.DataFrame(cells), pd.DataFrame(certified))
    pd.DataFrame(training).to_parquet(tmp_path / "training.parquet")
    kinds = paradox_models(results, tmp_path)
    table = paradox_table(results, kinds)
    assert table["seed"].tolist() == [0, 1, 3, 3, 0, 1, 2, 3]  # IBP, then CROWN, by seed
    tight = tight_minus_ibp(table)
    assert tight.to_dict("records") == [{"optimiser": "PGPE", "relaxation": "CROWN", "n": 2,
                                         "paper's sign": "+",
                                         "crown@0.1": "+0.050 [-0.050, +0.150]"}]
    assert [paper_sign("GRAD", "CROWN-IBP"), paper_sign("GRAD", "CROWN"),
            paper_sign("RGS", "CROWN")] == ["+", "-", "+"]
    (tmp_path / "figures").mkdir()
    md, _ = gls_section(results, tmp_path, tmp_path)
    assert "### Tight minus IBP" in md and (tmp_path / "figures" / "paradox.png").exists()


def test_the_gls_seeds_matrix_pairs_every_seed_and_keeps_the_paradox_budget():
    from certbench.matrix import load_matrix
    from certbench.training.recipes import training_relaxation

    spec = load_matrix("gls-seeds")
    kinds = {(training_relaxation(m.recipe, m.recipe_args), m.seed) for m in spec.models}
    assert kinds == {((o, r), s) for o in ("GRAD", "PGPE") for r in ("IBP", "CROWN")
                     for s in (0, 1, 2)}
    paradox = {m.name: m for m in load_matrix("gls-paradox").models}
    for m in spec.models:
        twin = paradox[m.name.rsplit("-s", 1)[0]]
        assert (m.arch, m.arch_args, m.recipe, m.recipe_args) == (
            twin.arch, twin.arch_args, twin.recipe, twin.recipe_args), m.name
