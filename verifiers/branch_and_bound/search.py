"""The branch-and-bound loop over ReLU splits (Bunel et al. 2020; Wang et al. 2021).

The pool holds open subdomains of one property (max_r c_r . f(x) - d_r > 0 on the set is
to be shown) as a stack of batches. Each round takes the ``batch_size`` newest domains
(depth first: to prove a property every open domain must be closed anyway, so the order
changes little of the work, and the pool stays within 2 x batch_size x depth domains,
depth being at most the number of unstable ReLUs: that is the memory cap), splits each
on its BaBSR neuron, bounds all children in one batched beta-CROWN pass, drops the
children whose bound clears the float allowance, and tests every child's primal point
(the minimiser of its linear bound) as a counterexample. A domain with no unstable ReLU
left is a leaf: the network is linear on it and an LP decides it exactly (l_inf and
boxes; l2 leaves are undecided). The search ends with the empty pool (``unsat``), a
confirmed counterexample (``sat``), an undecidable leaf (``unknown``) or the deadline
(``timeout``), never with a bound that merely stopped improving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from certbench.verifiers.branch_and_bound.branching import babsr, fsb
from certbench.verifiers.branch_and_bound.domains import DomainBounder, Domains
from certbench.verifiers.specification import SpecVerdict


@dataclass
class SearchStats:
    """What the search did: columns of the certificate."""

    domains: int = 0  # subdomains bounded after the root
    input_boxes: int = 0  # boxes bounded by input splitting (input_split.py)
    depth: int = 0  # most splits on one path
    lp_leaves: int = 0
    bound_s: float = 0.0  # time in beta-CROWN passes
    branch_s: float = 0.0  # time choosing, splitting and managing the pool

    def add(self, other: SearchStats) -> None:
        self.domains += other.domains
        self.input_boxes += other.input_boxes
        self.depth = max(self.depth, other.depth)
        self.lp_leaves += other.lp_leaves
        self.bound_s += other.bound_s
        self.branch_s += other.branch_s

    def columns(self) -> dict[str, float]:
        return {"bab_domains": float(self.domains),
                "bab_input_boxes": float(self.input_boxes), "bab_depth": float(self.depth),
                "bab_lp_leaves": float(self.lp_leaves), "bab_bound_s": self.bound_s,
                "bab_branch_s": self.branch_s}


@dataclass
class SearchResult:
    verdict: SpecVerdict
    counterexample: torch.Tensor | None = None
    stats: SearchStats = field(default_factory=SearchStats)
    abandoned: bool = False  # input splitting gave up (input_split.hopeless): not an answer
    method: str | None = None  # the split that decided: "input split", "relu split", ...


Confirm = Callable[[torch.Tensor], torch.Tensor | None]
"""Points (m, *input) -> the first that is a true counterexample (1, *input), or None."""

Leaf = Callable[[Domains], "tuple[SpecVerdict, torch.Tensor | None]"]
"""A single fully split domain -> (unsat | sat with its point | unknown)."""


BRANCHING = ("babsr", "fsb")


def branch_and_bound(
    bounder: DomainBounder, root: Domains, root_coefficients: dict[int, torch.Tensor],
    slack: float, deadline: float, confirm: Confirm, leaf: Leaf | None,
    batch_size: int = 1024, iterations: int = 10, branching: str = "babsr",
) -> SearchResult:
    """Decide the property whose root domain ``root`` (bounded, with its last pass's
    ``root_coefficients``) is given; see the module docstring. ``branching``: BaBSR or
    filtered smart branching (branching.py)."""
    prop = bounder.prop
    stats = SearchStats()

    def choose(domains: Domains, coefficients: dict[int, torch.Tensor]) -> torch.Tensor:
        if branching == "fsb":
            return fsb(bounder, domains, coefficients)
        return babsr(prop, domains.lower, domains.upper, coefficients)

    if float(root.value[0]) > slack:
        return SearchResult(SpecVerdict.UNSAT, stats=stats)
    found = _falsify(bounder, root_coefficients, confirm)
    if found is not None:
        return SearchResult(SpecVerdict.SAT, found, stats)
    root.branch = choose(root, root_coefficients)
    pool = [root]  # a stack of batches of open domains, newest last
    while pool:
        if time.perf_counter() > deadline:
            return SearchResult(SpecVerdict.TIMEOUT, stats=stats)
        t0 = time.perf_counter()
        batch = pop_newest(pool, batch_size)
        leaves = batch.branch[:, 0] < 0
        if leaves.any():
            for k in leaves.nonzero().flatten().tolist():
                stats.lp_leaves += 1
                verdict, point = (SpecVerdict.UNKNOWN, None) if leaf is None else leaf(
                    batch.take(slice(k, k + 1)))
                if verdict != SpecVerdict.UNSAT:
                    return SearchResult(verdict, point, stats)
            batch = batch.take((~leaves).nonzero().flatten())
        if not len(batch):
            continue
        children = batch.split(prop.relu_inputs)
        stats.branch_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        coefficients = bounder.bound(children, iterations, slack, deadline=deadline)
        stats.bound_s += time.perf_counter() - t0
        stats.domains += len(children)
        stats.depth = max(stats.depth, int(children.depth.max()))
        t0 = time.perf_counter()
        open_ = (children.value <= slack).nonzero().flatten()
        if len(open_):
            coefficients = {k: v[open_] for k, v in coefficients.items()}
            children = children.take(open_)
            found = _falsify(bounder, coefficients, confirm)
            if found is not None:
                return SearchResult(SpecVerdict.SAT, found, stats)
            children.branch = choose(children, coefficients)
            pool.append(children)
        stats.branch_s += time.perf_counter() - t0
    return SearchResult(SpecVerdict.UNSAT, stats=stats)


def pop_newest(pool: list, size: int):
    """Up to ``size`` items from the top of a stack of batches (`Domains`, or input
    splitting's `Boxes`: anything with len, ``take`` and ``cat``), as one batch; a batch
    taken in part leaves its rest on the stack (slices: no copy)."""
    taken, count = [], 0
    while pool and count < size:
        chunk = pool.pop()
        need = size - count
        if len(chunk) > need:
            pool.append(chunk.take(slice(need, None)))
            chunk = chunk.take(slice(0, need))
        taken.append(chunk)
        count += len(chunk)
    return taken[0] if len(taken) == 1 else type(taken[0]).cat(taken)


def _falsify(bounder: DomainBounder, coefficients: dict[int, torch.Tensor],
             confirm: Confirm) -> torch.Tensor | None:
    points = bounder.primal_points(coefficients[0])
    return confirm(points.flatten(0, 1))
