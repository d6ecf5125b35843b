"""Sequential CERTIFY: the thresholds it proves hold with probability 1 - alpha whatever
made it stop (simulated with a binomial oracle of known p_A, near the thresholds too,
against a binomial test; the same loop with a per-look test at level alpha fails that
test, so the test can tell); its group-sequential boundaries spend what the spending
function allows (checked by an independent direct recursion); and on networks it matches
fixed-N CERTIFY with far fewer draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest
from test_smoothing import SIGMA, distance_to_boundary, linear_classifier, points_at

from certbench.verifiers import get_verifier, group_sequential
from certbench.verifiers.smoothing import look_sizes, sequential_estimate
from conftest import DIGITS_SHAPE

ALPHA = 0.05  # large, so that a too-optimistic rule shows within a few thousand runs
RUNS = 4000
THRESHOLDS = np.array([0.5, 0.7, 0.9])  # 1/2 and the p_A two epsilons need
LOOKS = look_sizes(64_000, 1.1)


def _oracle(p_a: torch.Tensor, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def draw(active, start, size):
        sizes = torch.full((len(active),), float(size), dtype=torch.float64)
        return torch.binomial(sizes, p_a[active], generator=generator).long()

    return draw


def _runs(p_true: float, alpha: float, seed: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """RUNS estimations at a known p_A: their draws and the thresholds they proved."""
    p_a = torch.full((RUNS,), p_true, dtype=torch.float64)
    _, used, proved = sequential_estimate(_oracle(p_a, seed), RUNS, THRESHOLDS, LOOKS,
                                          alpha, **options)
    return used.double(), proved


def _wrong(p_true: float, alpha: float, seed: int) -> int:
    """Runs that proved p_A > t for some threshold t >= the true p_A."""
    _, proved = _runs(p_true, alpha, seed)
    return int((proved & torch.from_numpy(THRESHOLDS >= p_true)).any(1).sum())


@pytest.mark.parametrize("p_true", [0.5, 0.65, 0.695, 0.7, 0.705, 0.9, 0.97, 0.999])
def test_the_proved_thresholds_hold_with_probability_1_minus_alpha(p_true):
    wrong = _wrong(p_true, ALPHA, seed=int(p_true * 1000))
    assert binomtest(wrong, RUNS, ALPHA, alternative="greater").pvalue > 1e-3, wrong


def test_the_test_catches_a_rule_that_tests_every_look_at_level_alpha(monkeypatch):
    """The binomial test at level alpha at every look (no spending) is too optimistic
    at a threshold: the binomial test above rejects it."""
    def naive(t, looks, alpha, power):
        return np.array([int(binom.ppf(1 - alpha, n, t)) + 1 for n in looks])

    monkeypatch.setattr(group_sequential, "boundaries", naive)
    wrong = _wrong(0.7, ALPHA, seed=1)
    assert binomtest(wrong, RUNS, ALPHA, alternative="greater").pvalue < 1e-6, wrong


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_the_boundaries_spend_at_most_the_spending_function_and_nearly_all_of_it(power):
    """Independent check by direct convolution on all counts: at p = t the first j looks
    cross with probability at most alpha (n_j / n_J)^power, at the end within 10 % of
    alpha (the count is discrete); for p < t less."""
    looks, t, alpha = tuple(range(100, 2001, 100)), 0.8, 0.01
    bounds = group_sequential.boundaries(t, looks, alpha, power)
    allowed = group_sequential.spending(looks, alpha, power)
    for j in range(1, len(looks) + 1):
        crossed = group_sequential.crossing_probability(t, looks[:j], bounds[:j])
        assert crossed <= allowed[j - 1] * (1 + 1e-9)
    assert crossed > 0.9 * alpha
    assert group_sequential.crossing_probability(0.78, looks, bounds) < crossed / 2


def test_looking_often_costs_little_power_next_to_one_look():
    """The boundaries count the correlation between looks: the last one of 100 looks
    needs only a few more successes than the fixed-size test at level alpha (a union
    bound, alpha / 100 at each look, would need many more)."""
    n, t, alpha = 100_000, 0.97725, 0.001
    fixed = int(binom.ppf(1 - alpha, n, t)) + 1
    union = int(binom.ppf(1 - alpha / 100, n, t)) + 1
    last = group_sequential.boundaries(t, tuple(range(1000, n + 1, 1000)), alpha, 1.0)[-1]
    assert fixed <= last < fixed + (union - fixed) / 2, (fixed, last, union)


def test_points_far_from_the_thresholds_stop_early():
    far, _ = _runs(0.999, ALPHA, seed=2)
    near, _ = _runs(0.7, ALPHA, seed=3)
    assert far.mean() == 1000 and near.mean() > 20_000


def test_futility_gives_up_below_a_threshold_early_and_rarely_above_it():
    """Stochastic curtailment: at p_A 0.69 (needed 0.7) the default futility level
    stops at a third of the draws the pure budget rule (futility ~ 0) uses; at 0.71,
    where the budget rule certifies 99.98 % of the time, the default (0.05, checked at
    every look) gives up at most 3 % of the certificates (measured 1.9 %) and 0.01 at
    most 0.5 %."""
    below = {f: _runs(0.69, ALPHA, seed=4, futility=f)[0].mean() for f in (1e-9, 0.05)}
    assert below[0.05] < below[1e-9] / 3, below
    for futility, kept in ((0.05, 0.97), (0.01, 0.995)):
        _, proved = _runs(0.71, ALPHA, seed=5, futility=futility)
        assert proved[:, 1].double().mean() >= kept


def test_the_looks_come_every_hundredth_of_n_in_whole_blocks_up_to_the_cap():
    assert look_sizes(100_000, 1.1) == tuple(range(1000, 110_001, 1000))
    assert look_sizes(1_000_000, 1.0) == tuple(range(10_000, 1_000_001, 10_000))
    assert look_sizes(2000, 1.0) == (1000, 2000)
    with pytest.raises(ValueError, match="cap"):
        get_verifier("smoothing", sequential=True, cap=0.9)


def test_on_a_linear_classifier_sequential_and_fixed_n_agree_with_fewer_draws():
    model = linear_classifier()
    distances = [0.02, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, -0.1, -0.5, -0.9]
    x = points_at(model, distances)
    eps = [0.1, 0.25, 0.5]
    fixed = get_verifier("smoothing", sigma=SIGMA, n=64_000)
    sequential = get_verifier("smoothing", sigma=SIGMA, n=64_000, sequential=True)
    for verifier in (fixed, sequential):
        verifier.prepare(model, DIGITS_SHAPE)
    a, b = fixed.certify(x, "2", eps), sequential.certify(x, "2", eps)
    disagree = (a.verdicts != b.verdicts).any(dim=1)
    assert disagree.sum() <= 1  # only a point whose radius lies next to an epsilon
    assert (b.radius <= distance_to_boundary(model, x) + 1e-9).all()  # sound (w.p. 1-alpha)
    assert (a.columns["noise_draws"] == 64_100).all()
    assert b.columns["noise_draws"].double().mean() < 64_100 / 3
    far = torch.tensor([abs(d) >= 0.8 for d in distances])
    assert (b.columns["noise_draws"][far] <= 2_100).all()
    # the reported bound is the largest threshold proved, and the radius its epsilon
    proved = b.verdicts == 0
    grid = torch.tensor(eps, dtype=torch.float64)
    assert torch.equal(b.radius, torch.where(proved, grid, 0.0).amax(1))
    assert ((b.columns["p_a_lower"] >= 0.5) == (b.prediction != -1)).all()


def test_a_noise_trained_network_with_far_fewer_draws(trained, digits):
    model = trained["mlp-noise"]
    x, y = digits.x_test[:60], digits.y_test[:60]
    eps = [0.25, 0.5, 0.75]
    results = {}
    for sequential in (False, True):
        verifier = get_verifier("smoothing", sigma=SIGMA, n=32_000, sequential=sequential)
        verifier.prepare(model, DIGITS_SHAPE)
        cert = verifier.certify(x, "2", eps)
        certified = ((cert.verdicts == 0) & (cert.prediction == y)[:, None]).double().mean(0)
        results[sequential] = certified, cert.columns["noise_draws"].double().mean()
    assert (results[True][0] - results[False][0]).abs().max() <= 0.05
    assert results[True][1] < results[False][1] / 3
