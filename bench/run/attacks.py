"""Projected gradient descent (Madry et al. 2018) in l2 and l_inf balls with restarts, the
per-cell attack of the harness (`attack_grid`: success at each epsilon and the smallest
adversarial distance found), and PGD against a smoothed classifier (`smoothed_pgd`).

An attack gives an *upper* bound on robust accuracy: a found adversarial example refutes
robustness, a failed attack proves nothing. It is never counted as a certificate.

Written here rather than imported: torchattacks 3.5.1 needs torchvision (no CPU build
here, and it pins requests ~= 2.25), and the adversarial-robustness-toolbox is a heavy
dependency for one 60-line loop. This one is batched, seeded, stays inside the [0, 1]
box, and maximises the margin loss max_{j != y} f_j - f_y (Carlini-Wagner style), which
flips predictions more reliably than cross-entropy near the decision boundary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from certbench.verifiers.falsification import (  # noqa: F401  (box_pgd: the harness's, too)
    box_pgd,
    projected_gradient,
    steepest_direction,
)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} f_j - f_y per sample; positive iff the prediction is not y."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -torch.inf)
    return others.max(dim=1).values - true


def _project(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "inf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    flat = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
    scale = torch.clamp(eps.flatten() / flat, max=1.0)
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


def _random_start(x: torch.Tensor, eps: torch.Tensor, norm: str, gen: torch.Generator):
    noise = torch.rand(x.shape, generator=gen, device="cpu").to(x.device)
    if norm == "inf":
        return (2 * noise - 1) * eps
    direction = torch.randn(x.shape, generator=gen).to(x.device)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
    radius = noise.flatten(1)[:, :1].view(-1, *([1] * (x.dim() - 1)))
    return direction * radius * eps


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    norm: str,
    steps: int = 50,
    restarts: int = 5,
    step_size: float = 2.5,
    seed: int = 0,
    targeted: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search the ball of radius ``eps`` (scalar or one per sample) around each x for a
    point classified other than y. Returns (best points, success mask). The step is
    ``step_size * eps / steps``; the first restart starts at x, later ones at random
    points of the ball. ``targeted`` more runs from x each ascend f_t - f_y for one of the
    classes t with the highest logits at x (the untargeted loss follows the currently
    strongest class, which need not have the nearest boundary)."""
    model.eval()
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    eps_t = eps_t.expand(len(x)) if eps_t.dim() == 0 else eps_t
    eps_b = eps_t.view(-1, *([1] * (x.dim() - 1)))
    alpha = step_size * eps_b / steps
    gen = torch.Generator().manual_seed(seed)
    best = x.clone()
    best_loss = torch.full((len(x),), -torch.inf, device=x.device)
    with torch.no_grad():
        ranked = model(x).scatter(1, y[:, None], -torch.inf).argsort(dim=1, descending=True)
    runs = [None] * restarts + [ranked[:, t] for t in range(min(targeted, ranked.shape[1] - 1))]
    for restart, target in enumerate(runs):
        start = restart == 0 or target is not None
        delta = torch.zeros_like(x) if start else _random_start(x, eps_b, norm, gen)
        delta = (x + delta).clamp(0, 1) - x

        def objective(d: torch.Tensor, target=target) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(x + d)
            loss = margin_loss(logits, y)
            ascent = loss if target is None else (
                logits.gather(1, target[:, None]) - logits.gather(1, y[:, None]))[:, 0]
            return ascent, loss.detach()

        def observe(d: torch.Tensor, loss: torch.Tensor) -> bool:
            nonlocal best_loss
            improved = loss > best_loss
            best[improved] = (x + d)[improved]
            best_loss = torch.where(improved, loss, best_loss)
            return False

        delta = projected_gradient(delta, objective, alpha,
                                   lambda g: steepest_direction(g, norm),
                                   lambda d: (x + _project(d, eps_b, norm)).clamp(0, 1) - x,
                                   steps, observe)
        with torch.no_grad():
            final = margin_loss(model(x + delta), y)
            improved = final > best_loss
            best[improved] = (x + delta)[improved]
            best_loss = torch.where(improved, final, best_loss)
    with torch.no_grad():
        success = model(best).argmax(1) != y
    return best.detach(), success


def distance(points: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """||points - x||_p per sample, float64."""
    return (points - x).flatten(1).double().norm(p=2 if norm == "2" else math.inf, dim=1)


@dataclass
class AttackOutcome:
    """PGD against a network's own predictions on a fixed sample set.

    success: (n, k) bool, a point of the eps_k ball is classified differently.
    distance: (n,) float64, the smallest ||x_adv - x||_p of any adversarial point found
        (bisection on epsilon), ``inf`` where none was found up to ``4 * max(eps)``.
    seconds: wall-clock time of the whole attack.
    """

    success: torch.Tensor
    distance: torch.Tensor
    seconds: float


def attack_grid(
    model: nn.Module, x: torch.Tensor, eps: list[float], norm: str, steps: int = 50,
    restarts: int = 3, bisection_steps: int = 8, seed: int = 0, batch_size: int = 256,
    targeted: int = 0,
) -> AttackOutcome:
    """PGD at every epsilon of the grid against the model's predictions, then a bisection
    per sample for the smallest adversarial distance: between the largest grid epsilon
    that failed and the smallest that succeeded (or ``4 * max(eps)``, 1 for l_inf).
    Samples are attacked ``batch_size`` at a time; ``targeted`` as for `pgd`."""
    started = time.perf_counter()
    parts = [_attack_batch(model, x[i : i + batch_size], eps, norm, steps, restarts,
                           bisection_steps, seed, targeted)
             for i in range(0, len(x), batch_size)]
    return AttackOutcome(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                         time.perf_counter() - started)


def _attack_batch(model, x, eps, norm, steps, restarts, bisection_steps, seed, targeted):
    with torch.no_grad():
        target = model(x).argmax(1)
    n = len(x)
    success = torch.zeros(n, len(eps), dtype=torch.bool)
    best = torch.full((n,), math.inf, dtype=torch.float64)
    lo = torch.zeros(n, dtype=torch.float64)
    for e in sorted(eps):
        points, found = pgd(model, x, target, e, norm, steps, restarts, seed=seed,
                            targeted=targeted)
        found = found.cpu()
        success[:, eps.index(e)] = found
        best = torch.where(found, torch.minimum(best, distance(points, x, norm).cpu()), best)
        lo = torch.where(~found & (best == math.inf), torch.full_like(lo, e), lo)
    top = min(4 * max(eps), 1.0) if norm == "inf" else 4 * max(eps)
    hi = torch.where(best < math.inf, best, torch.full_like(best, top))
    missing = best == math.inf
    if missing.any():
        idx = missing.nonzero().flatten()
        points, found = pgd(model, x[idx], target[idx], top, norm, steps, restarts, seed=seed,
                            targeted=targeted)
        dist = distance(points, x[idx], norm).cpu()
        best[idx] = torch.where(found.cpu(), dist, best[idx])
        hi[idx] = torch.where(found.cpu(), dist, hi[idx])
    searching = (best < math.inf).nonzero().flatten()
    for _ in range(bisection_steps if len(searching) else 0):
        mid = (lo[searching] + hi[searching]) / 2
        device_idx = searching.to(x.device)
        points, found = pgd(model, x[device_idx], target[device_idx],
                            mid.to(x.device, x.dtype), norm, steps, restarts, seed=seed,
                            targeted=targeted)
        found = found.cpu()
        dist = distance(points, x[device_idx], norm).cpu()
        best[searching] = torch.where(found, torch.minimum(best[searching], dist),
                                      best[searching])
        hi[searching] = torch.where(found, mid, hi[searching])
        lo[searching] = torch.where(found, lo[searching], mid)
    return success, best


def smoothed_pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: str,
    sigma: float, noise_samples: int = 16, steps: int = 20, seed: int = 0,
) -> torch.Tensor:
    """PGD against a Gaussian-smoothed classifier (Salman et al. 2019, "Provably Robust
    Deep Learning via Adversarially Trained Smoothed Classifiers", Eq. 4-5): ascend
    -log of the mean softmax probability of y over ``noise_samples`` noisy copies. Returns
    the final points (whether they fool the smoothed classifier is for PREDICT to say)."""
    gen = torch.Generator().manual_seed(seed)
    eps_b = eps.view(-1, *([1] * (x.dim() - 1))).to(x)

    def objective(d: torch.Tensor) -> tuple[torch.Tensor, None]:
        noise = torch.randn((noise_samples, *x.shape), generator=gen).to(x) * sigma
        noisy = ((x + d).unsqueeze(0) + noise).flatten(0, 1)
        logits = model(noisy).reshape(noise_samples, len(x), -1)
        probs = torch.softmax(logits.flatten(0, 1), dim=1).view_as(logits).mean(0)
        return -torch.log(probs.gather(1, y[:, None]).clamp(min=1e-12)), None

    delta = projected_gradient(torch.zeros_like(x), objective, 2.5 * eps_b / steps,
                               lambda g: steepest_direction(g, norm),
                               lambda d: (x + _project(d, eps_b, norm)).clamp(0, 1) - x, steps)
    return (x + delta).detach()
