"""Subdomains of a ReLU network's input set and their beta-CROWN bounds.

A subdomain is the input set (an l_inf or l2 ball, or a box) on which some unstable
ReLUs are fixed: z_k >= 0 (*active*, sign +1) or z_k <= 0 (*inactive*, sign -1). For a
linear objective c . f(x) and multipliers beta >= 0 (Wang et al. 2021, "Beta-CROWN",
Sec. 3.1, Thm. 3.1),

    min_{x in set, s_k z_k(x) >= 0} c . f(x)  >=  min_{x in set} c . f(x) - sum_k beta_k s_k z_k(x),

and the right side is what the engine's backward pass bounds when -beta_k s_k is added to
the coefficient of z_k (`BoundPropagator.backward`'s ``extra``) and the split neurons are
relaxed exactly (lower bound clamped to 0 when active, upper bound to 0 when inactive).
The ReLU slopes alpha of the output's pass and the multipliers beta are optimised jointly
by Adam (lr 0.1 and 0.05, alpha-beta-CROWN's defaults; torch's fused kernel, one pass
over the parameters a step instead of one per operation), projected on [0, 1] and
[0, inf); every (alpha, beta) gives a sound bound, so the best value seen is kept, and a
child starts from its parent's value (a subset's minimum is never lower) and parameters.

Intermediate bounds are the root's (alpha-CROWN), with split neurons clamped: beta
carries each split into the output's bound, and a fully split domain's bound tends to the
exact LP value as beta converges. Re-tightening intermediate layers per subdomain (the
joint optimisation of Sec. 3.3) is tighter per domain and costlier per step; it is not
done here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import torch

from certbench.verifiers.bound_propagation.propagation import Ball, BoundPropagator

ALPHA_LR = 0.1
BETA_LR = 0.05


@dataclass
class Domains:
    """A batch of n subdomains of one property with R objective rows. Keys of ``lower``,
    ``upper``, ``signs`` and ``betas`` are ReLU input nodes, of ``alphas`` activation
    nodes (`BoundPropagator.relu_inputs` and ``activations``)."""

    lower: dict[int, torch.Tensor]  # (n, *shape) pre-activation bounds, splits applied
    upper: dict[int, torch.Tensor]
    signs: dict[int, torch.Tensor]  # (n, *shape) int8: +1 active, -1 inactive, 0 free
    alphas: dict[int, torch.Tensor]  # (n, R, *shape) lower slopes of unstable ReLUs
    betas: dict[int, torch.Tensor]  # (n, R, *shape) >= 0, nonzero only where split
    value: torch.Tensor  # (n,) best lower bound of max_r (c_r . f(x) - d_r)
    depth: torch.Tensor  # (n,) number of splits
    branch: torch.Tensor  # (n, 2): (position in relu_inputs, flat index) to split next; -1: none

    def __len__(self) -> int:
        return len(self.value)

    def take(self, index: torch.Tensor | slice) -> Domains:
        return Domains(**{f.name: _map(getattr(self, f.name), lambda t: t[index])
                          for f in fields(self)})

    @staticmethod
    def cat(parts: list[Domains]) -> Domains:
        parts = [p for p in parts if len(p)]
        first = parts[0]
        out = {}
        for f in fields(first):
            value = getattr(first, f.name)
            if isinstance(value, dict):
                out[f.name] = {k: torch.cat([getattr(p, f.name)[k] for p in parts]) for k in value}
            else:
                out[f.name] = torch.cat([getattr(p, f.name) for p in parts])
        return Domains(**out)

    def split(self, relu_inputs: list[int]) -> Domains:
        """Both children of every domain on its ``branch`` neuron: first all active
        children (z >= 0), then all inactive ones (z <= 0); new multipliers start at 0."""
        n = len(self)
        rows = torch.arange(n, device=self.value.device)
        active, inactive = self.take(rows), self.take(rows)
        active.lower = dict(active.lower)
        inactive.upper = dict(inactive.upper)
        for position, node in enumerate(relu_inputs):
            chosen = self.branch[:, 0] == position
            if not chosen.any():
                continue
            which, index = rows[chosen], self.branch[chosen, 1]
            for child, bound, sign, clamp in ((active, "lower", 1, torch.clamp_min),
                                              (inactive, "upper", -1, torch.clamp_max)):
                values = getattr(child, bound)[node].flatten(1).clone()
                values[which, index] = clamp(values[which, index], 0.0)
                getattr(child, bound)[node] = values.reshape(self.lower[node].shape)
                signs = child.signs[node].flatten(1).clone()
                signs[which, index] = sign
                child.signs = {**child.signs, node: signs.reshape(self.signs[node].shape)}
        children = Domains.cat([active, inactive])
        children.depth = children.depth + 1
        children.branch = torch.full_like(children.branch, -1)
        return children


def _map(value, fn):
    return {k: fn(v) for k, v in value.items()} if isinstance(value, dict) else fn(value)


class DomainBounder:
    """beta-CROWN bounds of subdomains of one property: max_r (c_r . f(x) - d_r) over
    the set ``ball`` (one ball, shared by every domain), ``c`` (R, outputs)."""

    def __init__(self, prop: BoundPropagator, ball: Ball, c: torch.Tensor, d: torch.Tensor):
        self.prop, self.ball, self.c, self.d = prop, ball, c, d

    def bound(self, domains: Domains, iterations: int, done: torch.Tensor | float,
              record: bool = True, deadline: float = math.inf) -> dict[int, torch.Tensor] | None:
        """Tighten ``domains.value`` in place with ``iterations`` Adam steps on (alpha,
        beta), stopping early once every value exceeds ``done`` or at ``deadline``
        (`time.perf_counter`: the search then times out); keep the final
        parameters in the domains. With ``record``, a last pass returns the coefficients
        of the bound at every activation and at the input (node 0), (n, R, *shape). The
        domains' bounds stay fixed over the round, so what of each ReLU's relaxation
        depends on them alone (its upper line, which neurons are unstable) is computed in
        the first pass and kept."""
        alphas = {a: p.detach().clone().requires_grad_(True) for a, p in domains.alphas.items()}
        betas = {i: b.detach().clone().requires_grad_(True) for i, b in domains.betas.items()}
        best = domains.value.clone()
        groups = [{"params": list(alphas.values()), "lr": ALPHA_LR},
                  {"params": list(betas.values()), "lr": BETA_LR}]
        optimiser = torch.optim.Adam([g for g in groups if g["params"]], fused=True)
        relaxations: dict[int, dict] = {}  # the bounds stay fixed over the round
        for _ in range(iterations if any(g["params"] for g in groups) else 0):
            if bool((best > done).all()) or time.perf_counter() > deadline:
                break
            with torch.enable_grad():
                gap = self._pass(domains, alphas, betas, relaxations=relaxations)
                loss = -gap.sum()
                optimiser.zero_grad()
                loss.backward()
            best = torch.maximum(best, gap.detach().amax(1))
            optimiser.step()
            with torch.no_grad():
                for p in alphas.values():
                    p.clamp_(0.0, 1.0)
                for p in betas.values():
                    p.clamp_(min=0.0)
        coefficients = None
        if record:
            coefficients = dict.fromkeys([0, *self.prop.activations])
        with torch.no_grad():
            if record or iterations:
                last = self._pass(domains, alphas, betas, coefficients, relaxations)
                best = torch.maximum(best, last.amax(1))
        domains.value = best
        domains.alphas = {a: p.detach() for a, p in alphas.items()}
        domains.betas = {i: b.detach() for i, b in betas.items()}
        return coefficients

    def _pass(self, domains: Domains, alphas, betas, coefficients=None,
              relaxations=None) -> torch.Tensor:
        """One beta-CROWN pass: lower bounds (n, R) of c_r . f(x) - d_r (``relaxations``:
        `BoundPropagator.backward`'s, kept over passes on the same domains)."""
        prop, n = self.prop, len(domains)
        spec = self.c.expand(n, *self.c.shape)
        bounds = {i: (domains.lower[i], domains.upper[i]) for i in prop.relu_inputs}
        extra = {i: -betas[i] * s.unsqueeze(1).to(self.c.dtype)
                 for i, s in domains.signs.items()}
        lb = prop.backward(prop.net.output, spec, self.ball, bounds, alphas, extra,
                           coefficients, relaxations)
        return lb - self.d

    def primal_points(self, input_coefficients: torch.Tensor) -> torch.Tensor:
        """The minimiser over the set of each row's linear bound (n, R, *input): a corner
        of the box for l_inf, centre - eps a/||a|| clamped to the box for l2 (clamping
        towards the box, which holds the centre, stays in the ball). Where the relaxation
        is tight these are the network's worst points: candidates for counterexamples."""
        a = input_coefficients
        lower, upper = (t.unsqueeze(1) for t in self.ball.box())
        if self.ball.norm == "inf":
            return torch.where(a >= 0, lower, upper)
        norms = a.flatten(2).norm(dim=2).clamp(min=1e-12)
        norms = norms.reshape(*a.shape[:2], *[1] * (a.dim() - 2))
        eps = torch.as_tensor(self.ball.eps, dtype=a.dtype, device=a.device)
        point = self.ball.center.unsqueeze(1) - eps * a / norms
        return torch.minimum(torch.maximum(point, lower), upper) if self.ball.clip else point
