"""Branching heuristics: which unstable ReLU to split next in each subdomain.

BaBSR (Bunel, Lu, Turkaslan, Torr, Kohli, Kumar 2020, "Branch and bound for piecewise
linear neural network verification", JMLR, Sec. 5.1), in the form alpha-beta-CROWN
implements it (heuristics/babsr.py). For an unstable neuron with pre-activation bounds
l < 0 < u, CROWN's upper relaxation y <= s (z - l), s = u / (u - l), costs the bound
min(A, 0) * (-s l) through its intercept, where A is the bound's coefficient of the ReLU's
output. Splitting removes that intercept and changes how the layer's bias b enters
(b A s on one side, b A (s - 1) on the other); the score estimates the change,

    score = | min(b A (s - 1), b A s) + min(A, 0) (-s l) |,

averaged over the objective's rows. The neuron with the largest score over all layers is
split; if every score is below 1e-3 (uninformative), the most negative intercept term is
used instead, and failing that the first unstable neuron.

Filtered smart branching (FSB; De Palma, Bunel, Desmaison, Dvijotham, Kohli, Torr, Kumar
2021, "Improved branch and bound for neural network verification via Lagrangian
decomposition", Sec. 5), as alpha-beta-CROWN's ``kfsb`` does it: the k neurons of
largest BaBSR score and the k of most negative intercept term (over all layers) are
candidates; each is split tentatively and both children bounded by one pass of the
engine with the parent's slopes and multipliers (no optimisation step); the candidate
whose worse child has the best bound is split. It costs 4k bound passes per domain and
round for a smaller tree (two 2022 mnist_fc instances: 25 347 and 19 501 domains where
BaBSR's committed runs needed 56 197 and 91 695; a third: 3x more;
docs/measurements.md). A heuristic only: whichever neuron it picks, the children's
bounds are computed afresh, so soundness does not depend on it.
"""

from __future__ import annotations

import torch

from certbench.verifiers.bound_propagation.operators import Conv, Dense
from certbench.verifiers.bound_propagation.propagation import BoundPropagator
from certbench.verifiers.branch_and_bound.domains import DomainBounder, Domains

UNINFORMATIVE = 1e-3
FSB_CANDIDATES = 3  # per score (alpha-beta-CROWN's default)


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


def neuron_scores(prop: BoundPropagator, lower: dict[int, torch.Tensor],
            upper: dict[int, torch.Tensor], coefficients: dict[int, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BaBSR scores (n, neurons of all layers; -1 where stable), intercept terms
    (+inf where stable) and the offsets of the layers in that concatenation."""
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
    device = scores[0].device
    offsets = torch.tensor([0, *[s.shape[1] for s in scores]], device=device).cumsum(0)
    return torch.cat(scores, 1), torch.cat(intercepts, 1), offsets


def flat_decisions(flat: torch.Tensor, valid: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(n, 2) (layer position, index in layer) of flat neuron indices; -1 where not valid."""
    layer = torch.searchsorted(offsets[1:], flat.contiguous(), right=True)
    decision = torch.full((len(flat), 2), -1, dtype=torch.long, device=flat.device)
    decision[:, 0] = torch.where(valid, layer, -1)
    decision[:, 1] = torch.where(valid, flat - offsets[layer], -1)
    return decision


def babsr(prop: BoundPropagator, lower: dict[int, torch.Tensor], upper: dict[int, torch.Tensor],
          coefficients: dict[int, torch.Tensor]) -> torch.Tensor:
    """(n, 2) decisions (position in ``prop.relu_inputs``, flat neuron index); (-1, -1)
    where no unstable neuron is left (the domain is a leaf: the network is linear on it)."""
    score, intercept, offsets = neuron_scores(prop, lower, upper, coefficients)
    best_score, by_score = score.max(1)
    best_intercept, by_intercept = intercept.min(1)
    flat = torch.where(best_score > UNINFORMATIVE, by_score,
                       torch.where(best_intercept < -1e-4, by_intercept, by_score))
    return flat_decisions(flat, best_score >= 0, offsets)


def fsb(bounder: DomainBounder, domains: Domains, coefficients: dict[int, torch.Tensor],
        candidates: int = FSB_CANDIDATES) -> torch.Tensor:
    """Filtered smart branching (module docstring): ``babsr``'s format of decisions."""
    prop = bounder.prop
    score, intercept, offsets = neuron_scores(prop, domains.lower, domains.upper, coefficients)
    k = min(candidates, score.shape[1])
    by_score = score.topk(k, dim=1)
    by_intercept = (-intercept).topk(k, dim=1)
    flats = torch.cat([by_score.indices, by_intercept.indices], 1)  # (n, 2k)
    valid = torch.cat([by_score.values > UNINFORMATIVE, by_intercept.values > 1e-4], 1)
    worse_child = torch.full(flats.shape, -torch.inf, dtype=domains.value.dtype,
                             device=flats.device)
    n = len(domains)
    with torch.no_grad():
        for j in range(flats.shape[1]):
            if not valid[:, j].any():
                continue
            trial = domains.take(slice(None))
            trial.branch = flat_decisions(flats[:, j], valid[:, j], offsets)
            children = trial.split(prop.relu_inputs)
            bound = bounder._pass(children, children.alphas, children.betas).amax(1)
            worse_child[:, j] = torch.minimum(bound[:n], bound[n:])
    worse_child = torch.where(valid, worse_child, -torch.inf)
    best, pick = worse_child.max(1)
    chosen = flats.gather(1, pick[:, None]).squeeze(1)
    fallback = babsr(prop, domains.lower, domains.upper, coefficients)
    decision = flat_decisions(chosen, torch.isfinite(best), offsets)
    return torch.where(torch.isfinite(best)[:, None], decision, fallback)
