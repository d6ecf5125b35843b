"""Branch and bound on the input box, for networks with few inputs (input splitting).

Where the input has a handful of coordinates (control networks such as ACAS Xu, 2-D
toy problems), splitting the input box beats splitting ReLUs: halving a box shrinks every
neuron's bounds at once, and CROWN's relaxation becomes exact as the boxes shrink
(Bunel et al. 2020, "Branch and Bound for Piecewise Linear Neural Network
Verification", Sec. 4, input domain splitting; ReluVal, Wang et al. 2018, Sec. 4.2,
bisection by "smear"). The pool holds open boxes of one disjunct of the unsafe set
(the property: max_r c_r . f(x) - d_r > 0 on the box) as a stack of batches; each round
takes the ``batch_size`` newest, halves each along the coordinate of largest smear
sum_r |a_rj| (u_j - l_j) (a_r the input coefficients of row r's CROWN bound on that box)
among the coordinates not much narrower than its widest (``MAX_ASPECT``),
bounds all children in one batched CROWN pass (intermediate bounds recomputed per box),
drops the children whose bound clears the float allowance, and tests every open child's
centre and the minimisers of its linear bounds as counterexamples. Depth first, as in
search.py: the pool stays within batch_size x depth boxes. It ends with the empty pool
(``unsat``), a confirmed counterexample (``sat``), a box too small to halve in floating
point (``unknown``) or the deadline (``timeout``). Only for boxes (l_inf balls, VNN-LIB
input boxes): children of an l2 ball's bounding box would hold points outside the ball.

With ``probe`` set, the search measures its own progress: a box closed at depth k is
2^-k of the root's volume, so the share of the volume proven so far over the time spent
projects when the whole box would be closed. Once ``PROBE_SHARE`` of its time and
``PROBE_ROUNDS`` rounds are spent, a search that at its rate would not finish in the
time it has is abandoned (`hopeless`),
and the caller gives the rest of the time to ReLU splitting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from certbench.verifiers.bound_propagation import Ball, BoundPropagator
from certbench.verifiers.branch_and_bound.search import (
    Confirm,
    SearchResult,
    SearchStats,
    pop_newest,
)
from certbench.verifiers.specification import SpecVerdict

MAX_ASPECT = 4.0
"""Only coordinates at least 1/MAX_ASPECT as wide (relative to the root box) as a box's
widest are candidates for its split: smear sees the output bound's dependence on a
coordinate, not the looseness that coordinate causes in the hidden layers, and alone it
can halve one coordinate down to float resolution while another stays wide."""


PROBE_SHARE = 0.2
"""The share of its time an input-splitting probe runs before it may be abandoned."""
PROBE_ROUNDS = 4
"""...and the rounds it runs at least: the pool doubles each round from one box, and
nothing closes before the boxes have shrunk (on cifar_biasfield, 5 s of CROWN per box,
a fifth of a 30 s budget is 1-2 rounds, and input splitting answered 3 of 5 given all)."""


def hopeless(proven: float, elapsed: float, total: float, rounds: int) -> bool:
    """After ``PROBE_SHARE`` of ``total`` seconds and ``PROBE_ROUNDS`` rounds, whether a
    search that proved the volume share ``proven`` in ``elapsed`` seconds would not close
    the rest in time at that rate (``proven / elapsed * total < 1``)."""
    return (rounds >= PROBE_ROUNDS and elapsed >= PROBE_SHARE * total
            and proven * total < elapsed)


@dataclass
class Boxes:
    """A batch of m open boxes: bounds (m, *input), the input coefficients
    (m, rows, *input) of each box's CROWN bound, and the number of halvings (m,)."""

    lower: torch.Tensor
    upper: torch.Tensor
    coefficients: torch.Tensor
    depth: torch.Tensor

    def __len__(self) -> int:
        return len(self.depth)

    def take(self, index: torch.Tensor | slice) -> Boxes:
        return Boxes(self.lower[index], self.upper[index], self.coefficients[index],
                     self.depth[index])

    @staticmethod
    def cat(parts: list[Boxes]) -> Boxes:
        return Boxes(*(torch.cat(ts) for ts in zip(
            *[(p.lower, p.upper, p.coefficients, p.depth) for p in parts], strict=True)))


def bound_boxes(prop: BoundPropagator, lower: torch.Tensor, upper: torch.Tensor,
                c: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per box (m, *input): the CROWN lower bound of max_r c_r . f(x) - d_r, and the input
    coefficients (m, rows, *input) of each row's linear bound. The box is bounded as a
    ball whose radius is widened by 4 ulps of its largest coordinate, so that the rounded
    centre -+ radius still contains [lower, upper]: the halves of a box then cover it,
    with no sliver left unproven."""
    center = (lower + upper) / 2
    ulp = torch.finfo(lower.dtype).eps * torch.maximum(lower.abs(), upper.abs())
    ball = Ball(center, (upper - lower) / 2 + 4 * ulp, "inf", clip=False)
    bounds = prop.intermediate_bounds(ball, "crown")
    record: dict[int, torch.Tensor | None] = {0: None}
    spec = c[None].expand(len(lower), *c.shape).contiguous()
    rows = prop.backward(prop.net.output, spec, ball, bounds, record=record)
    return (rows - d).max(dim=1).values, record[0]


def input_split_search(
    prop: BoundPropagator, lower: torch.Tensor, upper: torch.Tensor, c: torch.Tensor,
    d: torch.Tensor, slack: float, deadline: float, confirm: Confirm,
    batch_size: int = 1024, probe: bool = False,
) -> SearchResult:
    """Decide one disjunct (rows c, d) on the box [lower, upper] (1, *input); see the
    module docstring."""
    stats = SearchStats()
    started = t0 = time.perf_counter()
    total = deadline - started
    proven, rounds = 0.0, 0
    value, coefficients = bound_boxes(prop, lower, upper, c, d)
    stats.bound_s += time.perf_counter() - t0
    if float(value[0]) > slack:
        return SearchResult(SpecVerdict.UNSAT, stats=stats)
    depth = torch.zeros(1, dtype=torch.long, device=lower.device)
    root_width = (upper - lower).flatten(1)
    pool = [Boxes(lower, upper, coefficients, depth)]
    while pool:
        if time.perf_counter() > deadline:
            return SearchResult(SpecVerdict.TIMEOUT, stats=stats)
        t0 = time.perf_counter()
        if probe and hopeless(proven, t0 - started, total, rounds):
            return SearchResult(SpecVerdict.UNKNOWN, stats=stats, abandoned=True)
        boxes = pop_newest(pool, batch_size)
        lo, hi, a, depth = boxes.lower, boxes.upper, boxes.coefficients, boxes.depth
        width = (hi - lo).flatten(1)
        relative = torch.where(root_width > 0, width / root_width.clamp(min=1e-30), 0.0)
        wide = relative >= relative.max(1, keepdim=True).values / MAX_ASPECT
        smear = a.abs().sum(1).flatten(1) * width
        dim = torch.where(wide & (width > 0), smear, torch.full_like(smear, -1.0)).argmax(1)
        rows = torch.arange(len(lo), device=lo.device)
        mid = ((lo.flatten(1)[rows, dim] + hi.flatten(1)[rows, dim]) / 2)
        stuck = (mid <= lo.flatten(1)[rows, dim]) | (mid >= hi.flatten(1)[rows, dim])
        if stuck.any():  # a box too small to halve in floating point
            return SearchResult(SpecVerdict.UNKNOWN, stats=stats)
        left_hi, right_lo = hi.flatten(1).clone(), lo.flatten(1).clone()
        left_hi[rows, dim], right_lo[rows, dim] = mid, mid
        child_lo = torch.cat([lo.flatten(1), right_lo]).reshape(-1, *lo.shape[1:])
        child_hi = torch.cat([left_hi, hi.flatten(1)]).reshape(-1, *lo.shape[1:])
        child_depth = torch.cat([depth, depth]) + 1
        stats.branch_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        value, a = bound_boxes(prop, child_lo, child_hi, c, d)
        stats.bound_s += time.perf_counter() - t0
        stats.input_boxes += len(child_lo)
        rounds += 1
        stats.depth = max(stats.depth, int(child_depth.max()))
        t0 = time.perf_counter()
        closed = value > slack
        proven += float(torch.exp2(-child_depth[closed].double()).sum())
        open_ = (~closed).nonzero().flatten()
        if len(open_):
            child_lo, child_hi = child_lo[open_], child_hi[open_]
            a, child_depth = a[open_], child_depth[open_]
            corners = torch.where(a >= 0, child_lo.unsqueeze(1), child_hi.unsqueeze(1))
            candidates = torch.cat([((child_lo + child_hi) / 2), corners.flatten(0, 1)])
            found = confirm(candidates)
            if found is not None:
                return SearchResult(SpecVerdict.SAT, found, stats)
            pool.append(Boxes(child_lo, child_hi, a, child_depth))
        stats.branch_s += time.perf_counter() - t0
    return SearchResult(SpecVerdict.UNSAT, stats=stats)
