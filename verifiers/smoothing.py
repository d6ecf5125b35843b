"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019, "Certified Adversarial Robustness
via Randomized Smoothing").

The smoothed classifier is g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), f the base
network. Theorem 1 (two-class form used by CERTIFY): if P(f(x + e) = c_A) >= p_A > 1/2,
then g(x + delta) = c_A for every ||delta||_2 < R = sigma * Phi^-1(p_A).

CERTIFY (Sec. 3.2, Pseudocode): guess c_A as the most frequent class over ``n0`` noisy
copies; count c_A over ``n`` fresh copies; p_A = the one-sided (1 - alpha) Clopper-Pearson
lower bound of the count, Beta(alpha; n_A, n - n_A + 1); abstain if p_A <= 1/2, else return
c_A with radius R. The guarantee holds with probability at least 1 - alpha over the noise:
certificates are *probabilistic* (``Certificate.probabilistic``, ``alpha``).

PREDICT (Sec. 3.1): the two most frequent classes over ``n`` copies, n_A and n_B; return
c_A if the two-sided binomial test of n_A against Binomial(n_A + n_B, 1/2) has p-value
<= alpha, else abstain. `RandomizedSmoothing.predict` implements it; the harness uses it
to check a certificate at an adversarial point.

l_inf: ||delta||_2 <= sqrt(d) ||delta||_inf, so the l_inf radius is R / sqrt(d) (sound,
and weak for large d, which is the point of showing it).

Noise is drawn on the model's device, ``batch_size`` copies per forward pass, counted
exactly with ``bincount``. Each sample's noise stream is seeded by ``seed`` and a hash of
the sample's bytes, so a sample's result does not depend on the batch it came in. The
noise is not clipped to [0, 1]: the base network is defined on all of R^d (as in Cohen et
al.). The column ``time_s`` is each sample's own wall-clock time, the method's main cost.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence

import torch
from scipy.stats import beta, binomtest
from scipy.stats import norm as normal
from torch import nn

from certbench.verifiers.base import (
    ABSTAIN,
    Certificate,
    Verdict,
    check_certify_call,
    register,
    verdict_code,
)


def clopper_pearson_lower(count: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound of a binomial proportion."""
    return 0.0 if count == 0 else float(beta.ppf(alpha, count, n - count + 1))


def smoothing_radius(p_a_lower: float, sigma: float) -> float:
    """sigma * Phi^-1(p_A) (Theorem 1); 0 when p_A <= 1/2 (the method abstains)."""
    return sigma * float(normal.ppf(p_a_lower)) if p_a_lower > 0.5 else 0.0


@register("smoothing", "randomized smoothing, Gaussian noise (Cohen et al. 2019); probabilistic")
class RandomizedSmoothing:
    """CERTIFY and PREDICT of Cohen et al.; defaults are the paper's (N0 = 100,
    N = 100 000, alpha = 0.001)."""

    name = method = "smoothing"

    def __init__(
        self,
        sigma: float = 0.25,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        batch_size: int = 10_000,
        seed: int = 0,
    ):
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if n0 < 1 or n < 1 or batch_size < 1:
            raise ValueError("n0, n and batch_size must be at least 1")
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
        self.sigma, self.n0, self.n, self.alpha = sigma, n0, n, alpha
        self.batch_size, self.seed = batch_size, seed
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model.eval()
        self.input_dim = math.prod(input_shape)

    def _generator(self, x: torch.Tensor, salt: int) -> torch.Generator:
        digest = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=8)
        digest.update(f"{self.seed}:{salt}".encode())
        seed = int.from_bytes(digest.digest(), "little") & (2**63 - 1)
        return torch.Generator(device=x.device).manual_seed(seed)

    @torch.no_grad()
    def counts(self, x: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        """Class counts of the base network over ``num`` noisy copies of one input x."""
        total = None
        for start in range(0, num, self.batch_size):
            size = min(self.batch_size, num - start)
            noise = torch.randn(
                (size, *x.shape), generator=generator, device=x.device, dtype=x.dtype
            )
            logits = self.model(x.unsqueeze(0) + self.sigma * noise)
            found = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
            total = found if total is None else total + found
        return total.cpu()

    @torch.no_grad()
    def certify(self, x: torch.Tensor, norm: str, eps: Sequence[float]) -> Certificate:
        check_certify_call(self.model, norm)
        n_samples = len(x)
        prediction = torch.full((n_samples,), ABSTAIN, dtype=torch.int64)
        radius = torch.zeros(n_samples, dtype=torch.float64)
        p_a_lower = torch.zeros(n_samples, dtype=torch.float64)
        count_a = torch.zeros(n_samples, dtype=torch.int64)
        seconds = torch.zeros(n_samples, dtype=torch.float64)
        for i in range(n_samples):
            started = time.perf_counter()
            guess = int(self.counts(x[i], self.n0, self._generator(x[i], 0)).argmax())
            counts = self.counts(x[i], self.n, self._generator(x[i], 1))
            count_a[i] = int(counts[guess])
            p_a_lower[i] = clopper_pearson_lower(int(counts[guess]), self.n, self.alpha)
            if p_a_lower[i] > 0.5:
                prediction[i] = guess
                radius[i] = smoothing_radius(float(p_a_lower[i]), self.sigma)
            seconds[i] = time.perf_counter() - started
        if norm == "inf":
            radius = radius / math.sqrt(self.input_dim)
        certified = radius[:, None] > torch.tensor(eps, dtype=torch.float64)
        not_certified = torch.where(
            prediction == ABSTAIN, verdict_code(Verdict.ABSTAIN),
            verdict_code(Verdict.NOT_CERTIFIED),
        )
        verdicts = torch.where(
            certified, verdict_code(Verdict.CERTIFIED), not_certified[:, None]
        ).to(torch.int8)
        return Certificate(
            prediction=prediction, verdicts=verdicts, radius=radius,
            columns={"p_a_lower": p_a_lower, "count_a": count_a, "time_s": seconds},
            probabilistic=True, alpha=self.alpha,
        )

    @torch.no_grad()
    def predict(self, x: torch.Tensor, n: int | None = None, alpha: float | None = None
                ) -> torch.Tensor:
        """PREDICT for each input of the batch: the class, or ABSTAIN."""
        check_certify_call(self.model, "2")
        n, alpha = n or self.n, alpha or self.alpha
        out = torch.full((len(x),), ABSTAIN, dtype=torch.int64)
        for i in range(len(x)):
            counts = self.counts(x[i], n, self._generator(x[i], 2))
            top2 = counts.topk(2)
            n_a, n_b = int(top2.values[0]), int(top2.values[1])
            if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
                out[i] = int(top2.indices[0])
        return out
