"""BaBSR, the branching heuristic: which unstable ReLU to split next in each subdomain.

Bunel, Lu, Turkaslan, Torr, Kohli, Kumar 2020 ("Branch and bound for piecewise linear
neural network verification", JMLR, Sec. 5.1), in the form alpha-beta-CROWN implements
it (heuristics/babsr.py). For an unstable neuron with pre-activation bounds l < 0 < u,
CROWN's upper relaxation y <= s (z - l), s = u / (u - l), costs the bound
min(A, 0) * (-s l) through its intercept, where A is the bound's coefficient of the ReLU's
output. Splitting removes that intercept and changes how the layer's bias b enters
(b A s on one side, b A (s - 1) on the other); the score estimates the change,

    score = | min(b A (s - 1), b A s) + min(A, 0) (-s l) |,

averaged over the objective's rows. The neuron with the largest score over all layers is
split; if every score is below 1e-3 (uninformative), the most negative intercept term is
used instead, and failing that the first unstable neuron.
"""

from __future__ import annotations

import torch

from certbench.verifiers.bound_propagation.operators import Conv, Dense
from certbench.verifiers.bound_propagation.propagation import BoundPropagator

UNINFORMATIVE = 1e-3


def layer_bias(prop: BoundPropagator, node: int) -> torch.Tensor | None:
    """The bias of the affine layer that computes ``node`` (broadcast to its shape)."""
    op = prop.net.nodes[node].op
    if isinstance(op, Dense) and op.bias is not None:
        return op.bias.detach()
    if isinstance(op, Conv) and op.module.bias is not None:
        bias = op.module.bias.detach()
        return bias.reshape(-1, *[1] * (len(prop.net.nodes[node].shape) - 1)).expand(
            prop.net.nodes[node].shape)
    return None


def babsr(prop: BoundPropagator, lower: dict[int, torch.Tensor], upper: dict[int, torch.Tensor],
          coefficients: dict[int, torch.Tensor]) -> torch.Tensor:
    """(n, 2) decisions (position in ``prop.relu_inputs``, flat neuron index); (-1, -1)
    where no unstable neuron is left (the domain is a leaf: the network is linear on it)."""
    scores, intercepts = [], []
    for node, activation in zip(prop.relu_inputs, prop.activations, strict=True):
        lo, hi = lower[node].flatten(1), upper[node].flatten(1)
        unstable = (lo < 0) & (hi > 0)
        a = coefficients[activation].flatten(2)  # (n, R, N)
        slope = torch.where(unstable, hi / (hi - lo).clamp(min=1e-12), 0.0)
        intercept = (-slope * lo).unsqueeze(1)
        intercept_term = a.clamp(max=0) * intercept
        bias = layer_bias(prop, node)
        if bias is None:
            bias_term = torch.zeros_like(a)
        else:
            ba = bias.flatten().to(a) * a
            s = slope.unsqueeze(1)
            bias_term = torch.minimum(ba * (s - 1), ba * s)
        score = (bias_term + intercept_term).abs().mean(1)
        scores.append(torch.where(unstable, score, -1.0))
        intercepts.append(torch.where(unstable, intercept_term.mean(1), torch.inf))
    n = len(next(iter(lower.values())))
    device = next(iter(lower.values())).device
    decision = torch.full((n, 2), -1, dtype=torch.long, device=device)
    sizes = [s.shape[1] for s in scores]
    offsets = torch.tensor([0, *sizes], device=device).cumsum(0)
    score, intercept = torch.cat(scores, 1), torch.cat(intercepts, 1)
    best_score, by_score = score.max(1)
    best_intercept, by_intercept = intercept.min(1)
    unstable_any = best_score >= 0
    flat = torch.where(best_score > UNINFORMATIVE, by_score,
                       torch.where(best_intercept < -1e-4, by_intercept, by_score))
    layer = torch.searchsorted(offsets[1:], flat, right=True)
    decision[:, 0] = torch.where(unstable_any, layer, -1)
    decision[:, 1] = torch.where(unstable_any, flat - offsets[layer], -1)
    return decision
