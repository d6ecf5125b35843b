"""Certified losses from margin bounds, and loss fusion for CROWN-IBP training.

The certified cross-entropy of the ``ibp`` / ``crown-ibp`` / ``crown`` recipes is
CE(-m, y), with m[j] a lower bound of the margin f_y - f_j over the eps-ball (m[y] = 0),
i.e. log(1 + sum_{j != y} exp(-m[j])). Unfused, m comes from bounding the specification
rows e_y - e_j, all K of them (the row j = y is zero), through the whole network.

**Loss fusion** (Xu et al. 2020, "Automatic Perturbation Analysis for Scalable Certified
Robustness and Beyond", NeurIPS 2020, auto_LiRPA's ``loss_fusion``) puts the loss into the
bounded graph: it bounds the *upper* bound of S = sum_j exp(f_j - f_y) directly, one
output row instead of K, so the backward pass no longer grows with the number of classes.
It is **not** the same loss. Each exp is replaced by its chord between the interval
bounds [l_j, u_j] of f_j - f_y (IBP's, in CROWN-IBP), and CROWN bounds the one linear
function sum_j s_j (f_j - f_y) that results. The chord lies above exp, by a lot when IBP's
interval is wide; bounding the sum jointly is sometimes tighter than the sum of per-row
bounds. Neither dominates: the two losses differ (``tests/test_loss_fusion.py`` measures
the gap) and their gradients differ. So it is kept as ``fusion = "lirpa"``, off by default.

What fuses *exactly* (``fusion = "exact"``, the ``crown-ibp`` recipe's default):

1. The specification is folded into the last dense layer: the backward pass starts at the
   penultimate node from the rows W_y - W_j (and constants b_y - b_j), read off the weights
   by indexing, instead of multiplying the (batch, K, K) specification into W (a K x K x
   hidden product per sample that dominates at many classes), and the zero row j = y is
   never propagated (its bound is exactly 0).
2. IBP runs once: the same interval pass gives IBP's margins (the CE(-m_IBP) part of the
   beta mix) and CROWN-IBP's intermediate bounds; unfused, it runs for each.

Both are reorderings of the same arithmetic: the loss values agree with the unfused ones
to rounding (1e-6 relative is tested on random networks); there is no saving in the CROWN
backward through the hidden layers itself, whose K - 1 rows are distinct (the relaxation
of each ReLU picks its slope by the sign of each row's coefficient, so rows do not combine
linearly). `tests/benchmarks/test_loss_fusion_speed.py` measures the ratio at 10 and at 200
classes. Networks whose last node is not a dense layer on a flat input fall back to the
unfused computation (same values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from certbench.verifiers.bound_propagation import Ball, BoundPropagator, margin_spec
from certbench.verifiers.bound_propagation.operators import Dense

FUSIONS = ("exact", "none", "lirpa")


def robust_ce(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(-m, y): the cross-entropy of the worst-case logits the margin bounds allow."""
    return F.cross_entropy(-margins, y)


def certified_fraction(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of the batch whose every margin j != y is proven positive (a 0-d tensor on
    the margins' device: reading it is left to the end of the epoch)."""
    others = ~F.one_hot(y, margins.shape[1]).bool()
    return ((margins > 0) | ~others).all(1).float().mean()


def other_classes(y: torch.Tensor, classes: int) -> torch.Tensor:
    """(batch, K - 1): the classes j != y of each sample, in increasing order."""
    j = torch.arange(classes - 1, device=y.device)[None].expand(len(y), -1)
    return j + (j >= y[:, None]).long()


def _full(part: torch.Tensor, others: torch.Tensor, classes: int) -> torch.Tensor:
    """(batch, K) margins with ``part`` (batch, K - 1) at ``others`` and 0 at y."""
    return part.new_zeros(len(part), classes).scatter(1, others, part)


def _fusable(prop: BoundPropagator) -> bool:
    out = prop.net.nodes[prop.net.output]
    return (isinstance(out.op, Dense) and len(out.inputs) == 1
            and len(prop.net.nodes[out.inputs[0]].shape) == 1)


def _folded_rows(prop: BoundPropagator, y: torch.Tensor, classes: int):
    """Rows W_y - W_j (batch, K - 1, hidden), constants b_y - b_j, the classes j and the
    penultimate node: the margin specification folded into the last dense layer."""
    out = prop.net.nodes[prop.net.output]
    weight, bias = out.op.weight, out.op.bias
    others = other_classes(y, classes)
    rows = weight[y][:, None, :] - weight[others]
    const = bias[y][:, None] - bias[others] if bias is not None else rows.new_zeros(
        rows.shape[:2])
    return rows, const, others, out.inputs[0]


def _interval_of_rows(rows, const, bounds):
    lower, upper = bounds
    mid, rad = ((upper + lower) / 2).unsqueeze(-1), ((upper - lower) / 2).unsqueeze(-1)
    centre = (rows @ mid).squeeze(-1) + const
    spread = (rows.abs() @ rad).squeeze(-1)
    return centre - spread, centre + spread


def crown_ibp_margins(
    prop: BoundPropagator, ball: Ball, y: torch.Tensor, classes: int, crown: bool = True,
    fusion: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(IBP margins, CROWN-IBP margins or None), each (batch, K) with 0 at y, as the
    ``crown-ibp`` recipe mixes them. ``fusion``: "exact" (module docstring) or "none"."""
    if fusion not in ("exact", "none"):
        raise ValueError(f"fusion must be 'exact' or 'none' for margins, got {fusion!r}")
    if fusion == "none" or not _fusable(prop):
        spec = margin_spec(y, classes, ball.center.dtype, all_rows=True)
        ibp = prop.lower_bound(spec, ball, "ibp")
        return ibp, prop.lower_bound(spec, ball, "crown-ibp") if crown else None
    rows, const, others, penultimate = _folded_rows(prop, y, classes)
    bounds = prop.ibp(ball)
    ibp, _ = _interval_of_rows(rows, const, bounds[penultimate])
    if not crown:
        return _full(ibp, others, classes), None
    intermediate = {i: bounds[i] for i in prop.relu_inputs}
    lower = prop.backward(penultimate, rows, ball, intermediate) + const
    return _full(ibp, others, classes), _full(lower, others, classes)


def lirpa_fused_ce(
    prop: BoundPropagator, ball: Ball, y: torch.Tensor, classes: int, beta: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """auto_LiRPA-style fused loss: log U per sample (``reduction="none"``) or its mean,
    U an upper bound of S = sum_j exp(f_j - f_y) over the ball,
    U = beta * U_CROWN-IBP + (1 - beta) * U_IBP.

    U_IBP = sum_j exp(u_j) with u_j IBP's upper bound of f_j - f_y (so log U_IBP is exactly
    the unfused IBP loss). U_CROWN-IBP: each exp(t) on [l_j, u_j] under its chord
    exp(l_j) + s_j (t - l_j), s_j = (exp(u_j) - exp(l_j)) / (u_j - l_j), and
    sum_j s_j (f_j - f_y) bounded by one CROWN-IBP backward row. Values shifted by
    c = max(0, max_j u_j) for stability (log U = c + log sum exp(. - c)). A sound upper
    bound of the worst-case CE, but not the unfused CE(-m_CROWN-IBP) (module docstring)."""
    if not _fusable(prop):
        raise ValueError("lirpa loss fusion needs a dense last layer on a flat input")
    rows, const, others, penultimate = _folded_rows(prop, y, classes)
    bounds = prop.ibp(ball)
    lower_margin, upper_margin = _interval_of_rows(rows, const, bounds[penultimate])
    lo, hi = -upper_margin, -lower_margin  # bounds of t_j = f_j - f_y, j != y
    shift = hi.max(1, keepdim=True).values.clamp(min=0).detach()
    head = torch.exp(-shift).squeeze(1)  # the term j = y: exp(0 - c)
    u_ibp = head + torch.exp(hi - shift).sum(1)
    if beta <= 0:
        loss = torch.log(u_ibp) + shift.squeeze(1)
        return loss.mean() if reduction == "mean" else loss
    e_lo, e_hi = torch.exp(lo - shift), torch.exp(hi - shift)
    width = hi - lo
    slope = torch.where(width > 1e-6, (e_hi - e_lo) / width.clamp(min=1e-6), e_hi)
    # sum_j s_j t_j = -sum_j s_j (f_y - f_j): its upper bound is minus the lower bound
    # of the one row sum_j s_j (W_y - W_j), plus the folded constants
    row = (slope.unsqueeze(-1) * rows).sum(1, keepdim=True)
    intermediate = {i: bounds[i] for i in prop.relu_inputs}
    linear_upper = -(prop.backward(penultimate, row, ball, intermediate).squeeze(1)
                     + (slope * const).sum(1))
    u_crown = head + (e_lo - slope * lo).sum(1) + linear_upper
    mixed = beta * u_crown + (1 - beta) * u_ibp
    loss = torch.log(mixed.clamp(min=1e-30)) + shift.squeeze(1)
    return loss.mean() if reduction == "mean" else loss


BOUNDS = ("ibp", "crown-ibp", "crown", "alpha-crown")


def relaxation_margins(
    prop: BoundPropagator, ball: Ball, y: torch.Tensor, classes: int, bound: str,
    beta: float = 0.0,
) -> torch.Tensor:
    """Margin lower bounds (batch, K) by the named relaxation ``bound`` (`BOUNDS`); for
    "crown-ibp", beta * CROWN-IBP + (1 - beta) * IBP (the ``crown-ibp`` recipe's mix),
    with exact fusion."""
    if bound in ("ibp", "crown-ibp"):
        ibp, crown_ibp = crown_ibp_margins(prop, ball, y, classes,
                                           crown=bound == "crown-ibp" and beta > 0)
        return ibp if crown_ibp is None else beta * crown_ibp + (1 - beta) * ibp
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")
    return prop.lower_bound(margin_spec(y, classes, ball.center.dtype, all_rows=True), ball, bound)
