"""Local Lipschitz bounds: a sound bound on each margin's Lipschitz constant over the ball,
and an estimate of it that is never counted as a certificate.

Bound (Fast-Lip, Weng et al. 2018, "Towards Fast Computation of Certified Robustness for
ReLU Networks", Sec. 3.4 and Eq. 13-15): on the ball B(x, r), the gradient of the margin
m_j = f_y - f_j is c_j^T W_L D_{L-1} W_{L-1} ... D_1 W_1 with each D_i diagonal: 0 for a
neuron the bound-propagation engine proves inactive on the ball, 1 for one proven active,
anywhere in [0, 1] for an unstable one (the Clarke derivative of ReLU at 0 included); a
MinMax layer's D is one of two permutations of each channel pair (`MinMax.gradient_bounds`).
Pushing c_j backward with interval arithmetic (center through W^T, radius through |W|^T,
an unstable neuron widens its interval to contain 0) bounds every entry of the gradient
over the ball: J_lo <= grad m_j(x') <= J_hi. The dual norm of max(|J_lo|, |J_hi|) (l2 for
an l2 ball, l1 for an l_inf ball) is then a Lipschitz constant L_j(r) of m_j on the ball,
and m_j(x') >= m_j(x) - L_j(r) r by the mean-value inequality along the segment. If every
neuron is stable the interval is a point and L_j(r) is the exact local constant.

Certified at eps: m_j(x) - slack > L_j(eps) * eps for every j != y, or certified by the
global GloRo bound of the same model (so the local radius is never below the global one).
Radius: bisection on r from the global radius up to ``radius_max`` (the lower end of the
last interval, itself a checked radius), after one probe at the global radius plus
``radius_tol`` that ends the search where the local bound cannot improve on it. L is
inflated by ``REL_SLACK`` for float32 rounding; the margin allowance is ``float_slack``.

Estimate: the largest dual gradient norm of any margin found at ``estimate_points``
uniform points of the ball and along ``estimate_steps`` projected descent steps on the
smallest margin from each. Gradient ascent on the gradient norm itself is blind for ReLU
networks (that norm is piecewise constant, its gradient zero almost everywhere), so the
search walks toward the decision boundary, crossing activation regions on the way. The
estimate is a *lower* bound on the true local constant; the gap to the sound bound is the
price of the relaxation. Column ``lipschitz_estimate``, from `diagnostics` (the harness
runs it once, outside the timed passes: it costs several times the certificate); the
bound is ``lipschitz_bound`` (both the maximum over j, per sample and epsilon).
"""

from __future__ import annotations

import math
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
from certbench.verifiers.bound_propagation.operators import Activation
from certbench.verifiers.bound_propagation.propagation import Ball, BoundPropagator, Bounds
from certbench.verifiers.bound_propagation.verifier import margin_spec
from certbench.verifiers.global_lipschitz import GlobalLipschitzVerifier

REL_SLACK = 1e-4
"""Relative inflation of the float32 local constant."""


def gradient_interval(
    propagator: BoundPropagator, spec: torch.Tensor, bounds: dict[int, Bounds]
) -> Bounds:
    """Elementwise bounds (batch, rows, *input) of the input gradient of spec . f over the
    region where every ReLU input lies within ``bounds``."""
    nodes = propagator.net.nodes
    out = propagator.net.output
    pending: dict[int, Bounds] = {out: (spec, spec)}
    for i in range(out, 0, -1):
        if i not in pending:
            continue
        lower, upper = pending.pop(i)
        node = nodes[i]
        if isinstance(node.op, Activation):
            z_lower, z_upper = (b.unsqueeze(1) for b in bounds[node.inputs[0]])
            inputs = [node.op.gradient_bounds(lower, upper, z_lower, z_upper)]
        else:
            center, radius = (upper + lower) / 2, (upper - lower) / 2
            centers, _ = node.op.backward(center)
            radii = node.op.abs_backward(radius)
            inputs = [(c - r, c + r) for c, r in zip(centers, radii, strict=True)]
        for j, (lo, hi) in zip(node.inputs, inputs, strict=True):
            if j in pending:
                lo, hi = pending[j][0] + lo, pending[j][1] + hi
            pending[j] = (lo, hi)
    return pending[0]


def dual_norm(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """||g||_* over the last dimension: l2 for an l2 ball, l1 for an l_inf ball."""
    return gradient.norm(p=2 if norm == "2" else 1, dim=-1)


def _uniform_in_ball(x: torch.Tensor, eps: torch.Tensor, norm: str, points: int,
                     generator: torch.Generator) -> torch.Tensor:
    """(batch, points, *shape) uniform in the ball around each x, clipped to [0, 1]
    (clipping moves a point closer to x, so it stays in the ball)."""
    shape = (len(x), points, *x.shape[1:])
    d = math.prod(x.shape[1:])
    eps = eps.view(-1, 1, *([1] * (x.dim() - 1)))
    if norm == "inf":
        delta = (2 * torch.rand(shape, generator=generator) - 1).to(x) * eps
    else:
        per_point = (len(x), points, *([1] * (x.dim() - 1)))
        direction = torch.randn(shape, generator=generator)
        direction = direction / direction.flatten(2).norm(dim=2).view(per_point)
        scale = torch.rand(len(x), points, generator=generator) ** (1 / d)
        delta = (direction * scale.view(per_point)).to(x) * eps
    return (x.unsqueeze(1) + delta).clamp(0, 1)


@register("local-lipschitz", "local Lipschitz bound from activation bounds (Fast-Lip), with "
          "a sampled estimate kept apart")
class LocalLipschitzVerifier:
    """Options: ``activation_bounds`` "crown" (default) or "ibp" (how neurons are
    classified stable); ``radius_max``, ``radius_tol`` (bisection); ``estimate_points``,
    ``estimate_steps`` (the estimate; 0 points switches it off); ``memory_budget_mb``,
    ``clip`` as for the CROWN family; ``seed`` for the estimate's sampling."""

    name = method = "local-lipschitz"

    def __init__(
        self,
        activation_bounds: str = "crown",
        radius_max: float = 2.0,
        radius_tol: float = 1e-3,
        estimate_points: int = 32,
        estimate_steps: int = 5,
        memory_budget_mb: float = 64,
        clip: bool = True,
        seed: int = 0,
    ):
        if activation_bounds not in ("crown", "ibp"):
            raise ValueError(
                f"activation_bounds must be 'crown' or 'ibp', got {activation_bounds!r}"
            )
        if radius_max <= 0 or radius_tol <= 0:
            raise ValueError("radius_max and radius_tol must be positive")
        self.activation_bounds = activation_bounds
        self.radius_max, self.radius_tol = radius_max, radius_tol
        self.estimate_points, self.estimate_steps = estimate_points, estimate_steps
        self.memory_budget_bytes = int(memory_budget_mb * 2**20)
        self.clip, self.seed = clip, seed
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model.eval()
        network = TracedNetwork(model, input_shape)
        network.check_supported(self.name)
        self.propagator = BoundPropagator(network, self.memory_budget_bytes)
        self.global_verifier = GlobalLipschitzVerifier("gloro")
        self.global_verifier.prepare(model, input_shape)

    def local_constants(
        self, x: torch.Tensor, spec: torch.Tensor, eps: float | torch.Tensor, norm: str
    ) -> torch.Tensor:
        """Sound Lipschitz constants (batch, rows) of the margins spec . f on the ball."""
        ball = Ball(x, eps, norm, self.clip)
        bounds = self.propagator.intermediate_bounds(ball, self.activation_bounds)
        lower, upper = gradient_interval(self.propagator, spec, bounds)
        magnitude = torch.maximum(lower.abs(), upper.abs()).flatten(2)
        return dual_norm(magnitude, norm).double() * (1 + REL_SLACK)

    def _holds(self, x, spec, margins, eps, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: is every margin above L(eps) * eps, and max_j L_j(eps)."""
        lip = self.local_constants(x, spec, eps, norm)
        eps = torch.as_tensor(eps, dtype=torch.float64, device=x.device).reshape(-1, 1)
        return (margins > lip * eps).all(dim=1), lip.max(dim=1).values

    @torch.no_grad()
    def certify(self, x: torch.Tensor, norm: str, eps: Sequence[float]) -> Certificate:
        check_certify_call(self.model, norm)
        logits = self.model(x)
        prediction = logits.argmax(1)
        spec = margin_spec(prediction, logits.shape[1]).to(x.dtype)
        margins = (spec.double() @ logits.double()[:, :, None])[..., 0]
        margins = margins - float_slack(logits)[:, None]
        global_cert = self.global_verifier.certify(x, norm, eps)
        certified = global_cert.verdicts.to(x.device) == verdict_code(Verdict.CERTIFIED)
        bound = torch.zeros(len(x), len(eps), dtype=torch.float64)
        for k, e in enumerate(eps):
            holds, lip = self._holds(x, spec, margins, e, norm)
            certified[:, k] |= holds
            bound[:, k] = lip.cpu()
        radius = self._bisect(x, spec, margins, global_cert.radius.to(x.device), norm)
        verdicts = torch.where(
            certified, verdict_code(Verdict.CERTIFIED), verdict_code(Verdict.NOT_CERTIFIED)
        ).to(torch.int8)
        return Certificate(
            prediction=prediction.cpu(), verdicts=verdicts.cpu(), radius=radius.cpu(),
            columns={"lipschitz_bound": bound, "global_radius": global_cert.radius.double()},
        )

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, norm: str, eps: Sequence[float]
                    ) -> dict[str, torch.Tensor]:
        """``lipschitz_estimate`` (n, k): `estimate` at every epsilon, beside the bound it
        never replaces (the harness runs it untimed: `Diagnosed`); no column where
        ``estimate_points`` is 0."""
        check_certify_call(self.model, norm)
        if self.estimate_points <= 0:
            return {}
        prediction = self.model(x).argmax(1)
        estimate = torch.empty(len(x), len(eps), dtype=torch.float64)
        for k, e in enumerate(eps):
            eps_t = torch.full((len(x),), float(e), dtype=x.dtype, device=x.device)
            estimate[:, k] = self.estimate(x, prediction, eps_t, norm).cpu()
        return {"lipschitz_estimate": estimate}

    def _bisect(self, x, spec, margins, global_radius, norm) -> torch.Tensor:
        lo = global_radius.to(x.dtype).clamp(max=self.radius_max)
        hi = torch.full_like(lo, self.radius_max)
        top, _ = self._holds(x, spec, margins, hi, norm)
        lo = torch.where(top, hi, lo)
        # one probe just above the start: where the local bound cannot beat the global
        # radius even there (all neurons unstable, say), the search ends at once
        step = torch.minimum(lo + self.radius_tol, hi)
        near, _ = self._holds(x, spec, margins, step, norm)
        hi = torch.where(near | top, hi, step)
        lo = torch.where(near & ~top, step, lo)
        while ((hi - lo) > self.radius_tol).any():
            mid = (lo + hi) / 2
            ok, _ = self._holds(x, spec, margins, mid, norm)
            ok |= (hi - lo) <= self.radius_tol  # finished samples stay put
            lo = torch.where(ok & ((hi - lo) > self.radius_tol), mid, lo)
            hi = torch.where(~ok, mid, hi)
        return torch.maximum(lo.double(), global_radius.double())

    @torch.enable_grad()
    def estimate(
        self, x: torch.Tensor, prediction: torch.Tensor, eps: torch.Tensor, norm: str
    ) -> torch.Tensor:
        """max over sampled and descent points of max_j ||grad (f_y - f_j)||_* (batch,)."""
        generator = torch.Generator().manual_seed(self.seed)
        points = _uniform_in_ball(x, eps, norm, self.estimate_points, generator)
        n, m = points.shape[:2]
        flat = points.reshape(n * m, *x.shape[1:])
        labels = prediction.repeat_interleave(m)
        centers = x.repeat_interleave(m, dim=0)
        radii = eps.repeat_interleave(m).view(-1, *([1] * (x.dim() - 1)))
        best = torch.zeros(n * m, dtype=torch.float64, device=x.device)
        step = 2.5 * radii / max(1, self.estimate_steps)
        for s in range(self.estimate_steps + 1):
            flat = flat.detach().requires_grad_(True)
            logits = self.model(flat)
            grads = torch.stack([
                torch.autograd.grad(logits[:, c].sum(), flat, retain_graph=True)[0].flatten(1)
                for c in range(logits.shape[1])
            ], dim=1)  # (n*m, classes, d)
            margin_grads = grads.gather(1, labels.view(-1, 1, 1).expand(-1, 1, grads.shape[2]))
            norms = dual_norm(margin_grads - grads, norm).double()
            best = torch.maximum(best, norms.max(dim=1).values)
            if s == self.estimate_steps:
                break
            with torch.no_grad():  # one descent step on the smallest margin
                margins = logits.gather(1, labels[:, None]) - logits
                margins.scatter_(1, labels[:, None], math.inf)
                worst = margins.argmin(dim=1)
                g = (margin_grads[:, 0] - grads[torch.arange(len(worst)), worst])
                g = g.view_as(flat)
                if norm == "inf":
                    direction = g.sign()
                else:
                    direction = g / g.flatten(1).norm(dim=1).clamp(min=1e-12).view_as(radii)
                moved = flat - step * direction - centers
                if norm == "inf":
                    moved = torch.maximum(torch.minimum(moved, radii), -radii)
                else:
                    length = moved.flatten(1).norm(dim=1).clamp(min=1e-12).view_as(radii)
                    moved = moved * torch.clamp(radii / length, max=1.0)
                flat = (centers + moved).clamp(0, 1)
        return best.view(n, m).max(dim=1).values
