"""Projected gradient descent for counterexamples to a property on an input set.

Complete verifiers look for a counterexample before they try to prove anything (most
non-robust points fall to a cheap attack), and the VNN-COMP harness does the same for
every verifier. The set is a box [lower, upper], optionally intersected with an l2 ball
||x - center|| <= radius (an l2 ball clipped to the pixel box). Written here rather than
imported for the reasons given in bench/attacks.py (no maintained attack library runs on
this CPU-only torch without torchvision); the harness re-exports it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn


def box_pgd(
    model: nn.Module, lower: torch.Tensor, upper: torch.Tensor,
    violation: Callable[[torch.Tensor], torch.Tensor], steps: int = 50, restarts: int = 8,
    seed: int = 0, center: torch.Tensor | None = None, radius: float | None = None,
    deadline: float = math.inf,
) -> tuple[torch.Tensor, float]:
    """Minimise ``violation(model(x))`` (<= 0 inside the unsafe set; `OutputSpec.violation`)
    over the box [lower, upper] (each (1, *input_shape)), within the l2 ball of ``radius``
    around ``center`` where given. All restarts run as one batch: the first from the set's
    centre, the others from uniform points (uniform radii along Gaussian directions for
    l2). Steps: sign steps of 2.5 x half-width / steps (box), normalised-gradient steps of
    2.5 x radius / steps (l2), each projected back onto the set. Returns the best point
    (1, *input_shape) and its violation. No step starts after ``deadline``
    (`time.perf_counter`); the starting points are always evaluated."""
    gen = torch.Generator().manual_seed(seed)
    shape = (restarts, *lower.shape[1:])
    noise = torch.rand(shape, generator=gen).to(lower)
    if radius is None:
        noise[0] = 0.5
        x = lower + noise * (upper - lower)
        step = 2.5 * (upper - lower) / 2 / steps
    else:
        direction = torch.randn(shape, generator=gen).to(lower)
        direction = direction / _norms(direction)
        x = center + direction * noise.flatten(1)[:, :1].reshape(_norms(direction).shape) * radius
        x[0] = center[0]
        x = torch.minimum(torch.maximum(x, lower), upper)
        step = 2.5 * radius / steps
    best, best_value = x[:1].clone(), math.inf
    model.eval()
    for _ in range(steps + 1):
        with torch.enable_grad():
            x.requires_grad_(True)
            value = violation(model(x))
            (grad,) = torch.autograd.grad(value.sum(), x)
        with torch.no_grad():
            k = int(value.argmin())
            if float(value[k]) < best_value:
                best, best_value = x[k : k + 1].detach().clone(), float(value[k])
            if best_value <= 0 or time.perf_counter() > deadline:
                break
            if radius is None:
                x = x - step * grad.sign()
            else:
                x = x - step * grad / _norms(grad).clamp(min=1e-12)
                delta = x - center
                x = center + delta * (radius / _norms(delta).clamp(min=1e-12)).clamp(max=1.0)
            # clamping towards a box that holds the centre never leaves the l2 ball
            x = torch.minimum(torch.maximum(x, lower), upper)
    return best, best_value


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))
