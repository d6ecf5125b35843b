"""The registered verifiers ``ibp``, ``crown``, ``crown-ibp`` and ``alpha-crown``.

Specification: for the predicted class y, the margins f_y - f_j for every j != y (one row
of the C matrix each). A sample is *certified* at eps when every margin's lower bound
exceeds a float allowance (``float_slack``: 1e-5 * (1 + max |f(x)|), so rounding in the
float32 bound computation cannot make a zero bound look positive).

Options:
- ``radius``: also find the largest certified eps per sample by bisection on
  [0, ``radius_max``] to ``radius_tol`` (the lower end of the final interval, so the
  radius is itself certified; 0 if nothing is);
- ``time_budget_s``: seconds per sample; the batch gets budget x batch size, and any eps
  not reached in time is recorded as *timeout*, never as *not certified*;
- ``alpha_iterations`` (20, auto_LiRPA's default), ``alpha_lr`` (0.1, alpha-beta-CROWN's
  default): alpha-CROWN's Adam steps; a sample leaves the optimisation once certified or
  after 10 steps without improvement (auto_LiRPA's patience). Step for step the bound
  is auto_LiRPA's: 20 steps verify 27 of 99 images on ERAN 6x100 at eps 0.026 and 35 of
  97 on 9x200 at 0.015, as auto_LiRPA does (docs/measurements.md);
- alpha-CROWN optimises a sample at an eps only if it certified it at every smaller eps
  of the grid (robustness is monotone in eps); elsewhere its bound is CROWN's, recorded
  as computed (this saves the optimisation of samples that can no longer count);
- ``memory_budget_mb``: cap on one backward pass's coefficients (chunking); the default
  64 MiB was measured faster than 256 MiB or 1 GiB on CPU (cache-sized chunks);
- ``clip``: intersect the ball with the [0, 1] input box (default true).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from certbench.verifiers.base import (
    Certificate,
    Verdict,
    check_certify_call,
    float_slack,
    register,
    verdict_code,
)
from certbench.verifiers.bound_propagation.graph import TracedNetwork
from certbench.verifiers.bound_propagation.propagation import Ball, BoundPropagator
from certbench.verifiers.specification import (
    OutputSpec,
    SpecResult,
    SpecVerdict,
    box_center_radius,
)

METHODS = ("ibp", "crown", "crown-ibp", "alpha-crown")


def margin_spec(prediction: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32,
                all_rows: bool = False) -> torch.Tensor:
    """C of shape (batch, classes - 1, classes): rows e_y - e_j for every j != y; with
    ``all_rows``, (batch, classes, classes) with a row for every j (row y is 0: the form
    of the certified-training losses, CE(-C f, y))."""
    eye = torch.eye(num_classes, device=prediction.device, dtype=dtype)
    if all_rows:
        return eye[prediction][:, None, :] - eye[None]
    others = torch.arange(num_classes, device=prediction.device)
    others = others[None].expand(len(prediction), -1)
    others = others[others != prediction[:, None]].reshape(len(prediction), num_classes - 1)
    return eye[prediction][:, None, :] - eye[others]


class LinearRelaxationVerifier:
    """Certify margins with one of METHODS; see the module docstring for options."""

    def __init__(
        self,
        method: str,
        radius: bool = False,
        radius_max: float = 1.0,
        radius_tol: float = 1e-3,
        time_budget_s: float | None = None,
        alpha_iterations: int = 20,
        alpha_lr: float = 0.1,
        memory_budget_mb: float = 64,
        clip: bool = True,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if radius_max <= 0 or radius_tol <= 0:
            raise ValueError("radius_max and radius_tol must be positive")
        self.method = self.name = method
        self.radius, self.radius_max, self.radius_tol = radius, radius_max, radius_tol
        self.time_budget_s = time_budget_s
        self.alpha_iterations, self.alpha_lr = alpha_iterations, alpha_lr
        self.memory_budget_bytes = int(memory_budget_mb * 2**20)
        self.clip = clip
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model.eval()
        network = TracedNetwork(model, input_shape)
        if self.method in ("crown", "alpha-crown"):  # IBP's intervals are tighter whole
            network = network.decomposed()
        self.propagator = BoundPropagator(network, self.memory_budget_bytes)

    @torch.no_grad()
    def margin_lower_bounds(
        self, x: torch.Tensor, spec: torch.Tensor, eps: float | torch.Tensor, norm: str,
        threshold: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Lower bounds (batch, rows) of the margins over the ball of radius eps;
        alpha-CROWN stops working on a sample once all its bounds exceed ``threshold``.
        Without autograd (alpha-CROWN records its own steps): called with it, every
        chunk's graph through the weights would stay alive, 24 GB for CROWN on 4 CIFAR
        inputs of a small ResNet. Training differentiates through `BoundPropagator`."""
        ball = Ball(x, eps, norm, self.clip)
        return self.propagator.lower_bound(
            spec, ball, self.method, self.alpha_iterations, self.alpha_lr, threshold
        )

    @torch.no_grad()
    def certify(self, x: torch.Tensor, norm: str, eps: Sequence[float]) -> Certificate:
        check_certify_call(self.model, norm)
        started = time.perf_counter()
        budget = math.inf if self.time_budget_s is None else self.time_budget_s * len(x)
        logits = self.model(x)
        prediction = logits.argmax(1)
        spec = margin_spec(prediction, logits.shape[1]).to(x.dtype)
        slack = float_slack(logits).to(x.dtype)
        verdicts = torch.full((len(x), len(eps)), verdict_code(Verdict.TIMEOUT), dtype=torch.int8)
        margin_lb = torch.full((len(x), len(eps)), math.nan, dtype=torch.float64)
        open_ = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for k in sorted(range(len(eps)), key=lambda k: eps[k]):
            if time.perf_counter() - started > budget:
                break
            threshold = torch.where(open_, slack, -math.inf)
            lb = self.margin_lower_bounds(x, spec, eps[k], norm, threshold).min(dim=1).values
            margin_lb[:, k] = lb.double().cpu()
            open_ &= lb > slack
            certified = (lb > slack).cpu()
            verdicts[:, k] = torch.where(
                certified, verdict_code(Verdict.CERTIFIED), verdict_code(Verdict.NOT_CERTIFIED)
            ).to(torch.int8)
        radius = None
        if self.radius:
            radius = self._bisect(x, spec, slack, norm, started, budget)
        return Certificate(
            prediction=prediction.cpu(), verdicts=verdicts, radius=radius,
            columns={"margin_lb": margin_lb},
        )

    @torch.no_grad()
    def check_spec(self, lower: torch.Tensor, upper: torch.Tensor, spec: OutputSpec,
                   time_limit_s: float) -> SpecResult:
        """``unsat`` if lower bounds of every row of the stacked C x f over the box prove
        each disjunct empty (specification.py), else ``unknown``: a bound method never
        claims a counterexample. Column ``bound``: min over disjuncts of the best row's
        lower bound of c.f - d (> 0 proves the property)."""
        check_certify_call(self.model, "inf")
        param = next(self.model.parameters())
        center, radius = (t.to(param.device) for t in box_center_radius(lower, upper, param.dtype))
        ball = Ball(center, radius, "inf", clip=False)
        c, d, owner = spec.to(center.dtype, center.device).stacked()
        slack = float(float_slack(self.model(center)))
        lb = self.propagator.lower_bound(
            c[None], ball, self.method, self.alpha_iterations, self.alpha_lr)[0]
        gap = (lb.double() - d.double()).cpu()
        bound = min(float(gap[owner == i].max()) for i in range(len(spec.disjuncts)))
        verdict = SpecVerdict.UNSAT if spec.proves_safe(lb, slack) else SpecVerdict.UNKNOWN
        return SpecResult(verdict, columns={"bound": bound})

    def _bisect(self, x, spec, slack, norm, started, budget) -> torch.Tensor:
        """Largest certified eps per sample, to radius_tol (the certified lower end)."""
        lo = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        hi = torch.full_like(lo, self.radius_max)
        top = self.margin_lower_bounds(x, spec, hi, norm, slack).min(dim=1).values > slack
        lo = torch.where(top, hi, lo)
        while ((hi - lo) > self.radius_tol).any() and time.perf_counter() - started <= budget:
            mid = (lo + hi) / 2
            ok = self.margin_lower_bounds(x, spec, mid, norm, slack).min(dim=1).values > slack
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        return lo.double().cpu()


def _factory(method: str):
    def make(**options) -> LinearRelaxationVerifier:
        return LinearRelaxationVerifier(method, **options)

    return make


register("ibp", "interval bound propagation (Gowal et al. 2018)")(_factory("ibp"))
register("crown", "CROWN linear relaxation, CROWN intermediate bounds (Zhang et al. 2018)")(
    _factory("crown")
)
register("crown-ibp", "CROWN final bound on IBP intermediate bounds (Zhang et al. 2020)")(
    _factory("crown-ibp")
)
register("alpha-crown", "CROWN with optimised ReLU lower slopes (Xu et al. 2021)")(
    _factory("alpha-crown")
)
