"""Sound linear relaxations of S-shaped activations (sigmoid, tanh) for CROWN.

Zhang et al. 2018, "Efficient Neural Network Robustness Certification with General
Activation Functions" (CROWN), Sec. 3.2 and Table 1; auto_LiRPA's BoundSigmoid and
BoundTanh use the same cases. For y = f(z), z in [l, u], we return lines with
``a_L z + b_L <= f(z) <= a_U z + b_U`` on all of [l, u].

Assumptions on f (sigmoid and tanh satisfy them): smooth, convex on z <= 0, concave on
z >= 0, so f' increases on z <= 0 and decreases on z >= 0 (peak at 0).

Upper line (the lower line is the upper line of g(w) = -f(-w) on [-u, -l], reflected:
g is S-shaped too, and negation is exact in floating point):

* u <= 0 (f convex on [l, u]): the chord through (l, f(l)) and (u, f(u)). A convex
  function lies below its chords.
* l >= 0 (f concave): the tangent at the midpoint m = (l + u) / 2. A concave function
  lies below each of its tangents.
* l < 0 < u, chord slope k = (f(u) - f(l)) / (u - l) <= f'(u): the chord. With
  e(z) = chord(z) - f(z), e(l) = e(u) = 0; e is convex on [0, u] with e'(u) = k - f'(u)
  <= 0, so e decreases to 0 there, and concave on [l, 0] with e(l), e(0) >= 0, so e >= 0.
* l < 0 < u, k > f'(u): the tangent at a point d in [0, u] that passes above (l, f(l)).
  T_d(z) = f(d) + f'(d) (z - d) lies above f on [0, inf) (concavity), and T_d - f is
  concave on [l, 0], so T_d >= f on [l, 0] iff phi(d) = T_d(l) - f(l) >= 0 (T_d(0) >=
  f(0) holds already). phi'(d) = f''(d) (l - d) > 0 for d > 0, phi(0) <= 0 (convexity on
  [l, 0]) and phi(u) = (u - l)(k - f'(u)) > 0: the tangent point d* of Zhang et al. (the
  tangent through (l, f(l))) is the root of phi and every d in [d*, u] is sound. Bisection
  on [0, u] keeps phi(lo) <= 0 <= phi(hi) and returns hi, so its error only loosens the
  bound, never breaks it.

Floating point: every line is widened by ``ALLOWANCE`` machine epsilons of the dtype
(about 2e-6 in float32) times the magnitude of its terms, 1 + |b| + |a| max(|l|, |u|).
That covers the rounding of f, f' and the coefficients, a wrong sign of phi near d* in the
bisection or of k - f'(u) near the chord/tangent switch (either line is then off by a few
roundings only), and rounding when a caller evaluates a z + b. The chord slope is clamped
to [min(f'(l), f'(u)), f'(clip(0, l, u))], which contains the exact chord slope (mean
value theorem), so cancellation in f(u) - f(l) on a tiny interval cannot produce a huge
slope; l == u takes slope f'(l) (the tangent), so degenerate intervals are exact up to the
allowance and never divide by zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Activation = Callable[[Tensor], Tensor]

BISECTION_STEPS = 30
ALLOWANCE = 16.0  # in machine epsilons of the input dtype, per unit of line magnitude


def sigmoid_derivative(z: Tensor) -> Tensor:
    """sigmoid'(z) = sigmoid(z) sigmoid(-z), accurate in relative terms for large |z|."""
    return torch.sigmoid(z) * torch.sigmoid(-z)


def tanh_derivative(z: Tensor) -> Tensor:
    """tanh'(z) = 1 / cosh(z)^2 = 4 e / (1 + e)^2 with e = exp(-2 |z|): no overflow, and
    no inf * 0 in autograd for large |z|."""
    e = torch.exp(-2 * z.abs())
    return 4 * e / (1 + e).square()


def _allowance(slope: Tensor, intercept: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """ALLOWANCE eps (1 + |b| + |a| max(|l|, |u|)): a bound on the rounding error of the
    line's coefficients and of evaluating a z + b or f(z) on [l, u]."""
    reach = torch.maximum(lower.abs(), upper.abs())
    eps = torch.finfo(lower.dtype).eps
    return ALLOWANCE * eps * (1 + intercept.abs() + slope.abs() * reach)


def _tangent_above_left_end(
    lower: Tensor, upper: Tensor, fn: Activation, derivative: Activation
) -> Tensor:
    """A point d in [0, max(u, 0)] with phi(d) = f(d) + f'(d)(l - d) - f(l) >= 0, found by
    bisection from the right: phi increases on d >= 0, so the returned end stays sound.
    Any such d is sound, so the search runs without autograd (d is a constant to it)."""
    with torch.no_grad():
        f_lower = fn(lower)
        lo, hi = torch.zeros_like(lower), upper.clamp(min=0)
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            above = fn(mid) + derivative(mid) * (lower - mid) >= f_lower
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    return hi


def _upper_line(
    lower: Tensor, upper: Tensor, fn: Activation, derivative: Activation
) -> tuple[Tensor, Tensor]:
    """Slope and intercept of a line above f on [l, u] (cases in the module docstring)."""
    width = upper - lower
    d_lower, d_upper = derivative(lower), derivative(upper)
    peak = derivative(lower.clamp(min=0).minimum(upper))
    safe_width = torch.where(width > 0, width, torch.ones_like(width))
    chord = torch.where(width > 0, (fn(upper) - fn(lower)) / safe_width, d_lower)
    chord = chord.clamp(min=torch.minimum(d_lower, d_upper), max=peak)
    use_chord = (upper <= 0) | ((lower < 0) & (chord <= d_upper))
    crossing_point = _tangent_above_left_end(lower, upper, fn, derivative)
    point = torch.where(lower >= 0, (lower + upper) / 2, crossing_point)
    tangent = derivative(point)
    slope = torch.where(use_chord, chord, tangent)
    intercept = torch.where(use_chord, fn(lower) - chord * lower, fn(point) - tangent * point)
    return slope, intercept + _allowance(slope, intercept, lower, upper)


def s_shaped_relaxation(
    lower: Tensor, upper: Tensor, fn: Activation, derivative: Activation
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear bounds of y = fn(z) for z in [lower, upper] (elementwise, lower <= upper):
    returns (lower_slope, lower_intercept, upper_slope, upper_intercept) with
    lower_slope z + lower_intercept <= fn(z) <= upper_slope z + upper_intercept.

    ``fn`` must be S-shaped (convex for z <= 0, concave for z >= 0) with derivative
    ``derivative``: torch.sigmoid with `sigmoid_derivative`, torch.tanh with
    `tanh_derivative`. The lower line is the upper line of -fn(-w) on [-upper, -lower].
    """
    upper_slope, upper_intercept = _upper_line(lower, upper, fn, derivative)
    lower_slope, neg_intercept = _upper_line(
        -upper, -lower, lambda w: -fn(-w), lambda w: derivative(-w)
    )
    return lower_slope, -neg_intercept, upper_slope, upper_intercept
