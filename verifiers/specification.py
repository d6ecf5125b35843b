"""General linear output specifications over an input box (VNN-COMP's properties).

A property states an input box [lower, upper] and an *unsafe* output set, a disjunction of
conjunctions of linear inequalities (VNN-LIB's convention):

    U = OR_i { y : C_i y <= d_i }.

It holds (``unsat``: no input in the box reaches U) when every disjunct is empty on the
box's image, and a disjunct is empty as soon as one of its rows satisfies
min_x c . f(x) > d. A bound-propagation verifier proves this from lower bounds of c . f(x),
one per row of the stacked C (`OutputSpec.stacked`), after subtracting the float allowance
of `base.float_slack`. A counterexample is a point of the box whose output lies in U
(`OutputSpec.violation` <= 0).

Verifiers that can answer such questions implement `SpecificationVerifier`; the harness
(`certbench.vnncomp`) judges every ``sat`` on the original ONNX network itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

import torch


class SpecVerdict(str, Enum):
    UNSAT = "unsat"  # proved: no input in the box reaches the unsafe set
    SAT = "sat"  # a counterexample (confirmed by the harness before it is reported)
    UNKNOWN = "unknown"  # the method's bound does not decide
    TIMEOUT = "timeout"  # the time limit ended the search


@dataclass(frozen=True)
class OutputSpec:
    """U = OR_i {y : C_i y <= d_i}; ``disjuncts`` holds (C_i (k_i, outputs), d_i (k_i,))."""

    disjuncts: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C (rows, outputs), d (rows,), disjunct index of each row)."""
        c = torch.cat([ci for ci, _ in self.disjuncts])
        d = torch.cat([di for _, di in self.disjuncts])
        owner = torch.cat([torch.full((len(di),), i, device=di.device)
                           for i, (_, di) in enumerate(self.disjuncts)])
        return c, d, owner

    def disjunct_violations(self, y: torch.Tensor) -> torch.Tensor:
        """max_j (C_i y - d_i)_j per sample of y (batch, outputs) and disjunct i: (batch,
        disjuncts), <= 0 where y lies in that disjunct. Differentiable."""
        return torch.stack([(y @ c.to(y).T - d.to(y)).amax(dim=1) for c, d in self.disjuncts],
                           dim=1)

    def violation(self, y: torch.Tensor) -> torch.Tensor:
        """min_i max_j (C_i y - d_i)_j per sample of y (batch, outputs): <= 0 exactly when
        y lies in U. Differentiable (the attack's loss)."""
        return self.disjunct_violations(y).amin(dim=1)

    def proves_safe(self, row_lower: torch.Tensor, slack: float) -> bool:
        """Whether lower bounds of C x f (rows,) show every disjunct empty: some row of each
        has a lower bound above its d by more than ``slack``."""
        _, d, owner = self.stacked()
        empty_row = (row_lower.double().cpu() - d.double().cpu()) > slack
        owner = owner.cpu()
        return all(bool(empty_row[owner == i].any()) for i in range(len(self.disjuncts)))

    def to(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> OutputSpec:
        return OutputSpec(tuple((c.to(device, dtype), d.to(device, dtype))
                                for c, d in self.disjuncts))


@dataclass
class SpecResult:
    """A verifier's answer on one box and specification. ``counterexample`` is a point
    (1, *input_shape) the verifier believes violates the property (the harness confirms
    it); ``columns`` holds method statistics (bounds, solver status, ...)."""

    verdict: SpecVerdict
    counterexample: torch.Tensor | None = None
    columns: dict[str, float] = field(default_factory=dict)
    method: str | None = None
    """What decided, where finer than the verifier's name (``bab: input split``): the
    results' method column."""


@runtime_checkable
class SpecificationVerifier(Protocol):
    """A verifier that also checks `OutputSpec`s on input boxes (after ``prepare``)."""

    def check_spec(
        self, lower: torch.Tensor, upper: torch.Tensor, spec: OutputSpec,
        time_limit_s: float,
    ) -> SpecResult:
        """Decide the property on the box [lower, upper] (each (1, *input_shape))."""
        ...


BOX_INFLATION = 1e-6


def box_center_radius(
    lower: torch.Tensor, upper: torch.Tensor, dtype: torch.dtype
) -> Sequence[torch.Tensor]:
    """The box as centre and per-coordinate radius in ``dtype`` (an l_inf ball with one
    radius per coordinate). The radius is widened by 1e-6 (1 + |centre|), so that the ball
    computed in float32 contains the box despite rounding of the centre and of c -+ r:
    proving a property on a larger box proves it on the box."""
    lower, upper = lower.double(), upper.double()
    if (lower > upper).any():
        raise ValueError("empty input box: lower > upper")
    center = (upper + lower) / 2
    radius = (upper - lower) / 2 + BOX_INFLATION * (1 + center.abs())
    return center.to(dtype), radius.to(dtype)
