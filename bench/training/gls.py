"""Gaussian Loss Smoothing (Balauca, Müller, Mao, Baader, Fischer and Vechev, "Gaussian Loss
Smoothing Enables Certified Training with Tight Convex Relaxations", arXiv 2403.07095,
TMLR 2025): certified training on the smoothed loss

    L_sigma(theta) = E_{e ~ N(0, sigma^2 I)} L_cert(theta + e),

smooth even where L_cert (the certified loss of a tight relaxation such as CROWN) jumps.
Two estimators of its gradient, each handed to the same Adam optimiser, cosine schedule,
epsilon ramp and kappa mix as the gradient recipes (so that a comparison isolates the
estimator):

- ``gls-pgpe``, PGPE (Sehnke et al. 2010, "Parameter-exploring policy gradients", Neural
  Networks 23(4), with symmetric sampling): zeroth order, loss values only, ``population``
  antithetic pairs e_i of one shared sigma,
      g = sum_i (L(theta + e_i) - L(theta - e_i)) e_i / (2 n sigma^2),
  an unbiased estimate of grad L_sigma (Stein's lemma). It needs no gradient of the
  relaxation, so it also trains through bounds whose gradient is useless. Sehnke et al.'s
  reward normalisation and their sigma adaptation are not used: Adam normalises the step
  already, and adapting sigma would change the objective the paper smooths with a fixed
  sigma; ``sigma`` may instead follow a linear schedule to ``sigma_end``. Its default
  learning rate is 1e-2, not GRAD's 1e-3: Adam moves each weight by about lr a step
  whatever the estimate's noise, so with an estimate that is mostly noise (n pairs in d
  dimensions, signal share about sqrt(n / d)) progress is lr times that share, and at 1e-3
  PGPE does not leave its initialisation in 20 epochs (docs/measurements.md: 9 % clean on
  digits at 1e-3, 84.5 % at 1e-2, 12 pairs).
- ``gls-rgs``, randomized gradient smoothing: the mean of ``samples`` gradients taken at
  perturbed weights theta + e_k. Cheaper (first order) but it differentiates *under* the
  expectation, which is only valid where L_cert is continuous: a jump's contribution to
  grad L_sigma is invisible to it (tests/test_gls.py shows both on a step function; the
  paper's first version called RGS "not theoretically sound" for this reason).

The certified loss is kappa * CE(f(x), y) + (1 - kappa) * CE(-m, y), m the margin bounds
of the relaxation ``bound`` (ibp, crown-ibp, crown, alpha-crown; `loss_fusion`), eps ramped
linearly from 0 over ``ramp_epochs`` and kappa from 1 to ``kappa_end`` alongside it, as in
the ``ibp`` / ``crown-ibp`` recipes. Every member of a population sees the same batch.

Own implementation rather than evotorch's PGPE: evotorch optimises a flat parameter
vector through its own problem/solver objects, ranking-based fitness shaping, ClipUp and
sigma adaptation by default, which would have to be switched off one by one to get the
plain estimator above; the estimator is ten lines, tested against closed forms here, and
keeps the project's one optimiser, resumption and progress bar. The loss is evaluated at
perturbed weights by writing them into the parameters in place (under no_grad) and
restoring the saved values in a ``finally``: the bound engine's operators hold the
module's parameter tensors from tracing, so ``torch.func.functional_call`` (which swaps
the module attributes) would not reach them.

Noise is drawn from a generator seeded by the training seed and the step, so a resumed
run draws what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certbench.training.loss_fusion import BOUNDS, certified_fraction, relaxation_margins, robust_ce
from certbench.verifiers.bound_propagation import Ball, BoundPropagator

_COMMON = {"epochs": 20, "lr": 1e-3, "batch_size": 128, "eps": 0.1, "norm": "inf",
           "ramp_epochs": None, "kappa_end": 0.0, "bound": "crown", "sigma": 0.01,
           "sigma_end": None}
GLS_DEFAULTS: dict[str, dict[str, Any]] = {
    # antithetic pairs: 64 loss values a step; lr 1e-2, ten times GRAD's (module docstring)
    "gls-pgpe": {**_COMMON, "population": 32, "lr": 1e-2},
    "gls-rgs": {**_COMMON, "samples": 4},
}


@dataclass
class Estimate:
    """A gradient estimate (one tensor per parameter) and the mean loss it saw."""

    grads: list[torch.Tensor]
    loss: float


def _assign(params: Sequence[torch.Tensor], centre, noise, sign: float) -> None:
    with torch.no_grad():
        for p, c, e in zip(params, centre, noise, strict=True):
            p.copy_(c + sign * e)


def _restore(params: Sequence[torch.Tensor], centre) -> None:
    with torch.no_grad():
        for p, c in zip(params, centre, strict=True):
            p.copy_(c)


def _noise(params, sigma: float, generator: torch.Generator) -> list[torch.Tensor]:
    return [sigma * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            for p in params]


def pgpe_gradient(evaluate: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                  sigma: float, pairs: int, generator: torch.Generator) -> Estimate:
    """PGPE with symmetric sampling: sum_i (L(theta + e_i) - L(theta - e_i)) e_i /
    (2 n sigma^2) over ``pairs`` draws e_i ~ N(0, sigma^2 I), L = ``evaluate()`` at the
    current values of ``params`` (written in place, restored on exit)."""
    centre = [p.detach().clone() for p in params]
    grads = [torch.zeros_like(c) for c in centre]
    total = 0.0
    try:
        with torch.no_grad():
            for _ in range(pairs):
                noise = _noise(params, sigma, generator)
                _assign(params, centre, noise, 1.0)
                plus = float(evaluate())
                _assign(params, centre, noise, -1.0)
                minus = float(evaluate())
                weight = (plus - minus) / (2 * pairs * sigma**2)
                for g, e in zip(grads, noise, strict=True):
                    g.add_(e, alpha=weight)
                total += plus + minus
    finally:
        _restore(params, centre)
    return Estimate(grads, total / (2 * pairs))


def rgs_gradient(evaluate: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                 sigma: float, samples: int, generator: torch.Generator) -> Estimate:
    """Randomized gradient smoothing: the mean of grad L(theta + e_k), k = 1..``samples``,
    e_k ~ N(0, sigma^2 I); parameters restored on exit."""
    centre = [p.detach().clone() for p in params]
    grads = [torch.zeros_like(c) for c in centre]
    total = 0.0
    try:
        for _ in range(samples):
            _assign(params, centre, _noise(params, sigma, generator), 1.0)
            with torch.enable_grad():
                loss = evaluate()
                parts = torch.autograd.grad(loss, list(params), allow_unused=True)
            for g, part in zip(grads, parts, strict=True):
                if part is not None:
                    g.add_(part, alpha=1.0 / samples)
            total += float(loss.detach())
    finally:
        _restore(params, centre)
    return Estimate(grads, total / samples)


def surrogate(params: Sequence[torch.Tensor], estimate: Estimate) -> torch.Tensor:
    """A scalar whose value is the estimate's loss and whose gradient with respect to
    ``params`` is the estimate: ``backward()`` on it hands the estimate to any optimiser."""
    inner = sum((p * g).sum() for p, g in zip(params, estimate.grads, strict=True))
    return inner - inner.detach() + estimate.loss


def schedule(args: dict[str, Any], progress: float) -> tuple[float, float, float, float]:
    """(eps, kappa, beta, sigma) after ``progress`` epochs: eps ramps from 0 and kappa from
    1 to ``kappa_end`` over ``ramp_epochs``, beta (the CROWN-IBP share of a crown-ibp
    bound) from 1 to 0 alongside, sigma linearly to ``sigma_end`` over all epochs."""
    ramp = 1.0 if args["ramp_epochs"] <= 0 else min(1.0, progress / args["ramp_epochs"])
    sigma = args["sigma"]
    if args.get("sigma_end") is not None:
        sigma += (args["sigma_end"] - sigma) * min(1.0, progress / max(args["epochs"], 1e-9))
    return args["eps"] * ramp, 1.0 + (args["kappa_end"] - 1.0) * ramp, 1.0 - ramp, sigma


def certified_loss(model: nn.Module, prop: BoundPropagator, x: torch.Tensor, y: torch.Tensor,
                   eps: float, kappa: float, bound: str, norm: str = "inf",
                   beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kappa * CE(f(x), y) + (1 - kappa) * CE(-m, y) and the margins m (None if kappa = 1,
    when they are not computed)."""
    logits = model(x)
    if kappa >= 1.0:
        return F.cross_entropy(logits, y), None
    margins = relaxation_margins(prop, Ball(x, eps, norm), y, logits.shape[1], bound, beta)
    return kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust_ce(margins, y), margins


def step_generator(seed: int, progress: float) -> torch.Generator:
    """The noise generator of one step, a function of the seed and the step only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + round(progress * 1e6))


def make_gls_loss(recipe: str, args: dict[str, Any], prop: BoundPropagator, seed: int,
                  log: list[torch.Tensor] | None = None):
    """The ``gls-pgpe`` / ``gls-rgs`` step as a loss for the training loop: its value is the
    estimate of L_sigma, its gradient the estimate of grad L_sigma (`surrogate`). The
    training-time certified accuracy at the unperturbed weights goes to ``log``."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float):
        eps, kappa, beta, sigma = schedule(args, progress)
        params = [p for p in model.parameters() if p.requires_grad]

        def evaluate() -> torch.Tensor:
            return certified_loss(model, prop, x, y, eps, kappa, args["bound"], args["norm"],
                                  beta)[0]

        generator = step_generator(seed, progress)
        if recipe == "gls-pgpe":
            estimate = pgpe_gradient(evaluate, params, sigma, int(args["population"]),
                                     generator)
        else:
            estimate = rgs_gradient(evaluate, params, sigma, int(args["samples"]), generator)
        if log is not None:
            with torch.no_grad():
                _, margins = certified_loss(model, prop, x, y, eps, kappa, args["bound"],
                                            args["norm"], beta)
            if margins is not None:
                log.append(certified_fraction(margins, y))
        return surrogate(params, estimate)

    return loss


def validate(recipe: str, args: dict[str, Any]) -> None:
    """Refuse values the GLS recipes cannot use (ValueError naming the argument)."""
    if args["bound"] not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}")
    if not args["sigma"] > 0 or (args["sigma_end"] is not None and not args["sigma_end"] > 0):
        raise ValueError("sigma and sigma_end must be positive")
    key = "population" if recipe == "gls-pgpe" else "samples"
    if int(args[key]) < 1:
        raise ValueError(f"{key} must be at least 1")


# -- the loss along a random direction in weight space (the paper's Fig. 1 / 3) ---------
def loss_along_direction(model: nn.Module, prop: BoundPropagator, x: torch.Tensor,
                         y: torch.Tensor, eps: float, bound: str, norm: str = "inf",
                         radius: float = 1.0, points: int = 41, sigma: float = 0.01,
                         samples: int = 16, seed: int = 0) -> dict[str, list[float]]:
    """The robust loss CE(-m, y) (kappa = 0) at theta + t d, t in [-radius, radius], d a
    Gaussian direction scaled per parameter tensor to that tensor's norm (filter-wise
    normalisation, Li et al. 2018), raw and smoothed: the mean over ``samples`` draws
    e ~ N(0, sigma^2 I), the same draws at every t (common random numbers)."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    centre = [p.detach().clone() for p in params]
    direction = []
    for c in centre:
        d = torch.randn(c.shape, generator=generator, dtype=c.dtype).to(c.device)
        direction.append(d * (c.norm() / d.norm().clamp(min=1e-12)))
    draws = [_noise(params, sigma, generator) for _ in range(samples)]
    ts = torch.linspace(-radius, radius, points).tolist()
    raw, smoothed = [], []
    try:
        with torch.no_grad():
            for t in ts:
                base = [c + t * d for c, d in zip(centre, direction, strict=True)]
                _restore(params, base)
                raw.append(float(certified_loss(model, prop, x, y, eps, 0.0, bound, norm)[0]))
                values = []
                for noise in draws:
                    _assign(params, base, noise, 1.0)
                    values.append(float(certified_loss(model, prop, x, y, eps, 0.0, bound,
                                                       norm)[0]))
                smoothed.append(sum(values) / len(values))
    finally:
        _restore(params, centre)
    return {"t": ts, "raw": raw, "smoothed": smoothed}

