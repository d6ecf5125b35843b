"""Sequential CERTIFY: its lower bound on p_A holds with probability 1 - alpha whatever
made it stop (simulated with a binomial oracle of known p_A, near the thresholds too,
against a binomial test; the same loop without the union-bound correction fails that test,
so the test can tell), and on a network it matches fixed-N CERTIFY with far fewer draws."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest
from test_smoothing import SIGMA, distance_to_boundary, linear_classifier, points_at

from certbench.verifiers import get_verifier, smoothing
from certbench.verifiers.smoothing import estimate, look_levels, look_schedule
from conftest import DIGITS_SHAPE

ALPHA = 0.05  # large, so that a too-optimistic rule shows within a few thousand runs
RUNS = 4000
NEEDED = [0.7, 0.9]  # the p_A two epsilons need


def _oracle(p_a: torch.Tensor, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def draw(active, start, size):
        sizes = torch.full((len(active),), float(size), dtype=torch.float64)
        return torch.binomial(sizes, p_a[active], generator=generator).long()

    return draw


def _runs(p_true: float, alpha: float, seed: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """RUNS estimations at a known p_A: their draws and lower bounds."""
    p_a = torch.full((RUNS,), p_true, dtype=torch.float64)
    needed = torch.tensor([NEEDED], dtype=torch.float64).expand(RUNS, -1)
    looks = look_schedule(1000, 64_000)
    _, used, lower = estimate(_oracle(p_a, seed), needed, looks, alpha, **options)
    return used.double(), lower


def _wrong_rate(p_true: float, alpha: float, seed: int) -> tuple[int, float]:
    """Runs whose lower bound exceeds the true p_A, and their mean draws."""
    used, lower = _runs(p_true, alpha, seed)
    return int((lower > p_true).sum()), float(used.mean())


@pytest.mark.parametrize("p_true", [0.65, 0.695, 0.7, 0.705, 0.9, 0.97, 0.999])
def test_the_lower_bound_holds_with_probability_1_minus_alpha(p_true):
    wrong, _ = _wrong_rate(p_true, ALPHA, seed=int(p_true * 1000))
    assert binomtest(wrong, RUNS, ALPHA, alternative="greater").pvalue > 1e-3, wrong


def test_the_test_catches_a_rule_without_the_correction(monkeypatch):
    """Clopper-Pearson at level alpha at every look (no union bound) is too optimistic
    at a threshold: the binomial test above rejects it."""
    monkeypatch.setattr(smoothing, "look_levels", lambda alpha, looks: [alpha] * looks)
    wrong, _ = _wrong_rate(0.7, ALPHA, seed=1)
    assert binomtest(wrong, RUNS, ALPHA, alternative="greater").pvalue < 1e-6, wrong


def test_the_levels_spend_alpha_with_half_at_the_last_look():
    for looks in (1, 2, 7):
        levels = look_levels(0.01, looks)
        assert len(levels) == looks and abs(sum(levels) - 0.01) < 1e-15
    assert look_levels(0.01, 7)[-1] == 0.005


def test_points_far_from_the_thresholds_stop_early():
    _, far = _wrong_rate(0.999, ALPHA, seed=2)
    _, near = _wrong_rate(0.7, ALPHA, seed=3)
    assert far == 1000 and near > 30_000


def test_futility_gives_up_below_a_threshold_early_and_rarely_above_it():
    """Stochastic curtailment: at p_A 0.69 (needed 0.7) the futility rule stops at a
    quarter of the draws the pure budget rule (futility ~ 0) uses; at 0.71, where fixed N
    always certifies, it gives up at most 1 % of the certificates."""
    below = {f: _runs(0.69, ALPHA, seed=4, futility=f)[0].mean() for f in (1e-9, 0.01)}
    assert below[0.01] < below[1e-9] / 3, below
    _, lower = _runs(0.71, ALPHA, seed=5)
    assert (lower > NEEDED[0]).double().mean() >= 0.99


def test_the_looks_grow_geometrically_in_whole_blocks():
    assert look_schedule(1000, 100_000) == [1000, 2000, 3000, 5000, 8000, 11_000, 17_000,
                                             26_000, 38_000, 58_000, 86_000, 100_000]
    assert look_schedule(1000, 64_000, ratio=2) == [1000 * 2**j for j in range(7)]
    with pytest.raises(ValueError, match="look_ratio"):
        get_verifier("smoothing", sequential=True, look_ratio=1.0)


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
    assert (b.columns["noise_draws"][far] == 1_100).all()


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
