"""Projected gradient descent for counterexamples to a property on an input set.

Complete verifiers look for a counterexample before they try to prove anything (most
non-robust points fall to a cheap attack), and the VNN-COMP harness does the same for
every verifier. The set is a box [lower, upper], optionally intersected with an l2 ball
||x - center|| <= radius (an l2 ball clipped to the pixel box). Written here rather than
imported for the reasons given in bench/run/attacks.py (no maintained attack library runs
on this CPU-only torch without torchvision). `projected_gradient` is the one PGD loop of
certbench: this falsifier and the harness's attacks each give it their objective, step and
projection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn


def steepest_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit step of steepest ascent in ``norm``: sign(g) for l_inf, g / ||g||_2 per row
    for l2."""
    if norm == "inf":
        return grad.sign()
    return grad / _norms(grad).clamp(min=1e-12)


def projected_gradient(
    v: torch.Tensor, objective: Callable[[torch.Tensor], tuple[torch.Tensor, object]],
    step: torch.Tensor | float, direction: Callable[[torch.Tensor], torch.Tensor],
    project: Callable[[torch.Tensor], torch.Tensor], steps: int,
    observe: Callable[[torch.Tensor, object], bool] | None = None,
) -> torch.Tensor:
    """The one PGD loop (Madry et al. 2018) that the harness's attack, its attack on the
    smoothed classifier and this module's falsifier share: ``steps`` times, the gradient g
    of ``objective(v)[0].sum()`` (one value per row), then ``observe(v, report)`` with the
    objective's second value (True stops the loop), then
    v <- project(v + step * direction(g)). Ascent or descent is the sign of ``step``;
    the set is whatever ``project`` maps onto. Returns the last v."""
    for _ in range(steps):
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            value, report = objective(v)
            (grad,) = torch.autograd.grad(value.sum(), v)
        with torch.no_grad():
            v = v.detach()
            if observe is not None and observe(v, report):
                break
            v = project(v + step * direction(grad))
    return v.detach()


def box_pgd(
    model: nn.Module, lower: torch.Tensor, upper: torch.Tensor,
    violation: Callable[[torch.Tensor], torch.Tensor], steps: int = 50, restarts: int = 8,
    seed: int = 0, center: torch.Tensor | None = None, radius: float | None = None,
    deadline: float = math.inf,
) -> tuple[torch.Tensor, float]:
    """Minimise ``violation(model(x))`` (<= 0 inside the unsafe set; `OutputSpec.violation`)
    over the box [lower, upper] (each (1, *input_shape)), within the l2 ball of ``radius``
    around ``center`` where given. ``violation`` may instead return one column per
    disjunct of the unsafe set (`OutputSpec.disjunct_violations`): the first three restarts
    descend the smallest column (the property's violation), each later one disjunct alone,
    in turn, so that a near but unreachable disjunct cannot draw every restart; a point's
    value is its smallest column. All restarts run as one batch:
    the first from the set's centre, for a box the next two from its lower and upper
    corners (where saturated networks often leave their plateau), the others from uniform
    points (uniform radii along Gaussian directions for l2). Steps: sign steps (box) or
    normalised-gradient steps (l2) of size s_t = s_0 (1 + cos(pi t / T)) / 2 for step t of
    T = steps + 1, s_0 half the box's half-width (or half the radius), each projected back
    onto the set: the first steps cross the set, the last ones settle (AutoPGD's decaying
    step, Croce and Hein 2020, Sec. 3.2, as a cosine; a fixed step of a few percent of the
    width stalls on saturated networks). Returns the best point (1, *input_shape) and its
    violation. No step starts after ``deadline`` (`time.perf_counter`); the starting
    points are always evaluated."""
    gen = torch.Generator().manual_seed(seed)
    shape = (restarts, *lower.shape[1:])
    noise = torch.rand(shape, generator=gen).to(lower)
    if radius is None:
        noise[0] = 0.5
        noise[1:3] = torch.tensor([0.0, 1.0])[: restarts - 1].reshape(-1, *[1] * (noise.dim() - 1))
        x = lower + noise * (upper - lower)
        first_step = (upper - lower) / 4
    else:
        direction = torch.randn(shape, generator=gen).to(lower)
        direction = direction / _norms(direction)
        x = center + direction * noise.flatten(1)[:, :1].reshape(_norms(direction).shape) * radius
        x[0] = center[0]
        x = torch.minimum(torch.maximum(x, lower), upper)
        first_step = radius / 2
    best, best_value = x[:1].clone(), math.inf
    model.eval()

    def observe(point: torch.Tensor, value: torch.Tensor) -> bool:
        nonlocal best, best_value
        k = int(value.argmin())
        if float(value[k]) < best_value:
            best, best_value = point[k : k + 1].clone(), float(value[k])
        return best_value <= 0 or time.perf_counter() > deadline

    def project(point: torch.Tensor) -> torch.Tensor:
        if radius is not None:
            delta = point - center
            point = center + delta * (radius / _norms(delta).clamp(min=1e-12)).clamp(max=1.0)
        # clamping towards a box that holds the centre never leaves the l2 ball
        return torch.minimum(torch.maximum(point, lower), upper)

    def objective(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = violation(model(point))
        if value.dim() == 1:
            return value, value.detach()
        rows = torch.arange(len(value), device=value.device)
        own = value[rows, (rows - 3).clamp(min=0) % value.shape[1]]
        descended = torch.where(rows < 3, value.amin(1), own)
        return descended, value.detach().amin(1)

    sizes = iter([0.5 * (1 + math.cos(math.pi * t / (steps + 1))) for t in range(steps + 1)])

    def scaled_step(grad: torch.Tensor) -> torch.Tensor:  # descent: step -1 below
        step = first_step * next(sizes)
        if radius is None:
            return step * grad.sign()
        return step * grad / _norms(grad).clamp(min=1e-12)

    projected_gradient(x, objective, -1.0, scaled_step, project, steps + 1, observe)
    return best, best_value


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))
