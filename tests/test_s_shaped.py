"""Linear relaxations of sigmoid and tanh (s_shaped.py): the lines enclose fn on dense
samples of many intervals in every case, in float32 and float64, and are tight where
they should be (narrow intervals, chords in the convex or concave region, tangents that
pass through the far endpoint)."""

from __future__ import annotations

import pytest
import torch

from certbench.verifiers.bound_propagation.s_shaped import (
    s_shaped_relaxation,
    sigmoid_derivative,
    tanh_derivative,
)

ACTIVATIONS = {
    "sigmoid": (torch.sigmoid, sigmoid_derivative),
    "tanh": (torch.tanh, tanh_derivative),
}
DTYPES = [torch.float32, torch.float64]
SAMPLES = 257


def uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def intervals(case: str, n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n intervals [l, u] (float64) of the named family."""
    gen = torch.Generator().manual_seed(seed)
    if case == "negative":
        a, b = uniform(gen, n, -20, 0), uniform(gen, n, -20, 0)
        return torch.minimum(a, b), torch.maximum(a, b)
    if case == "positive":
        a, b = uniform(gen, n, 0, 20), uniform(gen, n, 0, 20)
        return torch.minimum(a, b), torch.maximum(a, b)
    if case == "crossing":
        scale = 10 ** uniform(gen, n, -4, 1.5)
        return -scale * uniform(gen, n, 1e-3, 1), scale * uniform(gen, n, 1e-3, 1)
    if case == "wide":
        lower = torch.tensor([-20.0, -50.0, -20.0, -1.0, -30.0, 0.0, -40.0])
        upper = torch.tensor([20.0, 50.0, 1.0, 20.0, 0.0, 30.0, -39.0])
        return lower.double(), upper.double()
    if case == "tiny":
        centre, width = uniform(gen, n, -12, 12), 10 ** uniform(gen, n, -12, -2)
        return centre - width / 2, centre + width / 2
    if case == "near-zero":
        scale = 10 ** uniform(gen, n, -9, -3)
        return -scale * uniform(gen, n, 0, 1), scale * uniform(gen, n, 0, 1)
    if case == "degenerate":
        point = torch.cat([uniform(gen, n, -25, 25), torch.tensor([0.0, 1e-30, -1e-30, 20.0])])
        return point, point.clone()
    raise ValueError(case)


CASES = ["negative", "positive", "crossing", "wide", "tiny", "near-zero", "degenerate"]


def dense_points(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """SAMPLES points of each [l, u] (last dimension), endpoints exactly included."""
    t = torch.linspace(0, 1, SAMPLES, dtype=lower.dtype)
    z = lower[..., None] + t * (upper - lower)[..., None]
    z[..., 0], z[..., -1] = lower, upper
    return torch.minimum(torch.maximum(z, lower[..., None]), upper[..., None])


def relax(name: str, lower: torch.Tensor, upper: torch.Tensor):
    fn, derivative = ACTIVATIONS[name]
    return s_shaped_relaxation(lower, upper, fn, derivative)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_lines_enclose_the_function(name, case, dtype):
    """lower line <= fn <= upper line at every sample, with the lines evaluated both
    exactly (float64, from the returned coefficients) and in the working dtype."""
    fn = ACTIVATIONS[name][0]
    lower, upper = (b.to(dtype) for b in intervals(case))
    lines = relax(name, lower, upper)
    assert all(t.dtype == dtype and t.shape == lower.shape for t in lines)
    assert all(torch.isfinite(t).all() for t in lines)
    z = dense_points(lower, upper)
    for work in (torch.float64, dtype):
        a_lo, b_lo, a_up, b_up = (t.to(work)[..., None] for t in lines)
        zw = z.to(work)
        y = fn(zw)
        below, above = y - (a_lo * zw + b_lo), (a_up * zw + b_up) - y
        assert below.min() >= 0, f"lower line above {name} by {-below.min().item():.3g}"
        assert above.min() >= 0, f"upper line below {name} by {-above.min().item():.3g}"


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_any_shape_and_no_nans(name):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 4, 5, generator=gen) * 10, torch.randn(2, 3, 4, 5, generator=gen)
    lower, upper = torch.minimum(a, b), torch.maximum(a, b)
    lower[0, 0] = upper[0, 0]
    lines = relax(name, lower, upper)
    assert all(t.shape == lower.shape and torch.isfinite(t).all() for t in lines)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_gradients_are_finite(name):
    """Bounds of intermediate layers carry gradients in alpha-CROWN: none may be NaN, also
    for saturated, degenerate and crossing intervals."""
    lower = torch.tensor([-60.0, -3.0, 0.0, 2.0, 50.0, -1e-8, 7.0], requires_grad=True)
    upper = torch.tensor([-59.0, 4.0, 0.0, 2.5, 60.0, 1e-8, 7.0], requires_grad=True)
    sum(t.sum() for t in relax(name, lower, upper)).backward()
    assert torch.isfinite(lower.grad).all() and torch.isfinite(upper.grad).all()


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("centre", [-8.0, -1.0, -0.005, 0.0, 0.003, 0.7, 5.0])
def test_narrow_interval_is_tight(name, centre):
    """On width 0.01 the two lines are within 1e-3 of each other on the whole interval
    (the gap of two lines is largest at an endpoint)."""
    lower = torch.tensor([centre - 0.005])
    upper = torch.tensor([centre + 0.005])
    a_lo, b_lo, a_up, b_up = relax(name, lower, upper)
    ends = torch.cat([lower, upper])
    gap = (a_up * ends + b_up) - (a_lo * ends + b_lo)
    assert gap.max() < 1e-3


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_chords_in_convex_and_concave_regions(name):
    """u <= 0: the upper line is the chord; l >= 0: the lower line is (both up to the
    float allowance, tiny in float64)."""
    fn = ACTIVATIONS[name][0]
    lower, upper = intervals("negative", n=200, seed=3)
    _, _, a_up, b_up = relax(name, lower, upper)
    torch.testing.assert_close(a_up * lower + b_up, fn(lower), rtol=0, atol=1e-12)
    torch.testing.assert_close(a_up * upper + b_up, fn(upper), rtol=0, atol=1e-12)
    lower, upper = intervals("positive", n=200, seed=4)
    a_lo, b_lo, _, _ = relax(name, lower, upper)
    torch.testing.assert_close(a_lo * lower + b_lo, fn(lower), rtol=0, atol=1e-12)
    torch.testing.assert_close(a_lo * upper + b_lo, fn(upper), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_crossing_tangents_pass_near_the_far_endpoint(name):
    """On [-4, 4] the chord is not an upper bound, so the upper line is the tangent
    through (l, fn(l)) found by bisection (and symmetrically for the lower line): it
    touches fn at l to within the bisection's resolution."""
    fn = ACTIVATIONS[name][0]
    lower, upper = torch.tensor([-4.0], dtype=torch.float64), torch.tensor([4.0]).double()
    a_lo, b_lo, a_up, b_up = relax(name, lower, upper)
    assert 0 <= (a_up * lower + b_up - fn(lower)).item() < 1e-7
    assert 0 <= (fn(upper) - (a_lo * upper + b_lo)).item() < 1e-7
    chord = (fn(upper) - fn(lower)) / (upper - lower)
    assert (a_up > chord).all() and (a_lo > chord).all()
