"""Projected gradient descent (Madry et al. 2018) in l2 and l_inf balls with restarts.

An attack gives an *upper* bound on robust accuracy: a found adversarial example refutes
robustness, a failed attack proves nothing. It is never counted as a certificate.

Written here rather than imported: torchattacks 3.5.1 needs torchvision (no CPU build
here, and it pins requests ~= 2.25), and the adversarial-robustness-toolbox is a heavy
dependency for one 60-line loop. This one is batched, seeded, stays inside the [0, 1]
box, and maximises the margin loss max_{j != y} f_j - f_y (Carlini-Wagner style), which
flips predictions more reliably than cross-entropy near the decision boundary.
"""

from __future__ import annotations

import torch
from torch import nn


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search the ball of radius ``eps`` (scalar or one per sample) around each x for a
    point classified other than y. Returns (best points, success mask). The step is
    ``step_size * eps / steps``; the first restart starts at x, later ones at random
    points of the ball."""
    model.eval()
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    eps_t = eps_t.expand(len(x)) if eps_t.dim() == 0 else eps_t
    eps_b = eps_t.view(-1, *([1] * (x.dim() - 1)))
    alpha = step_size * eps_b / steps
    gen = torch.Generator().manual_seed(seed)
    best = x.clone()
    best_loss = torch.full((len(x),), -torch.inf, device=x.device)
    for restart in range(restarts):
        delta = torch.zeros_like(x) if restart == 0 else _random_start(x, eps_b, norm, gen)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = margin_loss(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                improved = loss.detach() > best_loss
                best[improved] = (x + delta.detach())[improved]
                best_loss = torch.where(improved, loss.detach(), best_loss)
                if norm == "inf":
                    step = grad.sign()
                else:
                    norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
                    step = grad / norms.view(-1, *([1] * (x.dim() - 1)))
                delta = _project(delta + alpha * step, eps_b, norm)
                delta = (x + delta).clamp(0, 1) - x
        with torch.no_grad():
            final = margin_loss(model(x + delta), y)
            improved = final > best_loss
            best[improved] = (x + delta)[improved]
            best_loss = torch.where(improved, final, best_loss)
    with torch.no_grad():
        success = model(best).argmax(1) != y
    return best.detach(), success
