"""Exact group-sequential boundaries for a one-sided binomial test (H0: p <= t against
p > t), looked at after n_1 < n_2 < ... < n_J Bernoulli draws.

At look j the test rejects H0 when the count of successes reaches c_j. The boundaries
spend alpha along the looks by the error-spending function of Lan and DeMets (1983,
"Discrete sequential boundaries for clinical trials", Biometrika 70): the probability
under p = t of a first crossing at or before look j is at most
alpha(tau_j) = alpha tau_j^rho, tau_j = n_j / n_J (the power family of Kim and DeMets
1987, rho = ``power``; rho = 1 spends alpha in proportion to the draws). The crossing
probabilities are computed exactly, by the recursion of Armitage, McPherson and Rowe
(1969, "Repeated significance tests on accumulating data", JRSS A 132) on the counts:
the sub-density of the count among the paths that have not crossed yet is convolved with
Binomial(n_j - n_{j-1}, t) from look to look, and c_j is the smallest count whose upper
tail under it fits in what is left of alpha(tau_j). Alpha a look cannot use (too few
draws for any count to be rare enough) passes to the next.

Guarantee: P_p(some look's count reaches its boundary) <= alpha for every p <= t. At
p = t that is the construction; for p < t the rejection event is increasing in the
draws (more successes can only cross sooner), so its probability grows with p. Unlike a
union bound over the looks (alpha / J at each), the recursion counts how strongly
successive looks are correlated, so looking often costs almost nothing: it is why a
look after every block of draws is affordable. Numerics: the recursion runs on failures
0..ceil(n_J (1 - t)) (a path with more failures can never cross again, so dropping it is
exact), the convolutions by FFT; the allowance at each look is reduced by ``SLACK``, more
than the FFT's rounding of the tail sums, so the computed boundaries err on the safe side.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.signal import fftconvolve
from scipy.stats import binom

SLACK = 1e-10
"""Probability taken off every look's allowance: covers the convolutions' rounding."""


def spending(looks: tuple[int, ...], alpha: float, power: float) -> np.ndarray:
    """alpha (n_j / n_J)^power: the type-I error the looks up to j may spend in all."""
    tau = np.asarray(looks, dtype=np.float64) / looks[-1]
    return alpha * tau**power


@lru_cache(maxsize=256)
def boundaries(threshold: float, looks: tuple[int, ...], alpha: float, power: float
               ) -> np.ndarray:
    """c_j, the success count at look j from which H0: p <= ``threshold`` is rejected
    (n_j + 1 where no count is rare enough); see the module docstring. Cached: a
    benchmark asks for the same few thresholds at every batch."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    if any(b <= a for a, b in zip(looks, looks[1:], strict=False)) or looks[0] < 1:
        raise ValueError(f"looks must be increasing positive sizes, got {looks}")
    q = 1.0 - threshold
    top = int(np.ceil(looks[-1] * q)) + 1  # failures kept: 0..top
    density = np.zeros(top + 1)
    density[0] = 1.0
    allowed = spending(looks, alpha, power)
    spent, previous, out = 0.0, 0, np.empty(len(looks), dtype=np.int64)
    for j, n in enumerate(looks):
        step = binom.pmf(np.arange(top + 1), n - previous, q)
        density = np.clip(fftconvolve(density, step)[: top + 1], 0.0, None)
        previous = n
        tail = np.cumsum(density)  # P(failures <= d, not crossed before)
        d = int(np.searchsorted(tail, allowed[j] - spent - SLACK, side="right")) - 1
        if d >= 0:
            spent += tail[d]
            density[: d + 1] = 0.0
        out[j] = n - d if d >= 0 else n + 1
    return out


def crossing_probability(p: float, looks: tuple[int, ...], bounds: np.ndarray) -> float:
    """P_p(the count reaches ``bounds[j]`` at some look j), by the same recursion with
    direct convolutions on all counts 0..n_J (the slow, independent check of
    `boundaries` the tests use)."""
    density, previous, crossed = np.ones(1), 0, 0.0
    for n, c in zip(looks, bounds, strict=True):
        density = np.convolve(density, binom.pmf(np.arange(n - previous + 1), n - previous, p))
        previous = n
        crossed += density[c:].sum()
        density[c:] = 0.0
    return float(crossed)
