"""Exact verification of small ReLU networks by mixed-integer linear programming.

For the predicted class y and each j != y, the question whether some input of the l_inf
ball intersected with [0, 1]^d has f_y(x) - f_j(x) <= the float allowance is decided
with scipy's HiGHS MILP solver (Tjeng, Xiao and Tedrake 2019, "Evaluating robustness of
neural networks with mixed integer programming", Sec. 4). Every linear operation of the
traced graph becomes a dense affine map; a ReLU y = max(z, 0) with pre-activation bounds
l < 0 < u gets one binary d and the big-M constraints

    y >= 0,  y >= z,  y <= u d,  y <= z - l (1 - d);

stable ReLUs are replaced by z or 0. Any activation that declares ``slopes`` (a convex
piecewise-linear one kinked at 0, e.g. LeakyReLU) is encoded the same way
(`MilpEncoding._kink_rows`); the others are refused (`Operation.refusal`). The bounds
l, u are alpha-CROWN's (the intermediate
bounds its slope optimisation tightens; tighter big-M constants, fewer binaries), and
its output bounds are the pre-check: rows they prove are skipped, the others are solved
lowest bound first. Each solve is a feasibility problem with the margin bounded above
(`MilpEncoding.find_point`): the solver stops at the first point it finds and prunes
every node whose relaxation cannot reach the bound, instead of minimising the margin to
the end.

Verdicts: *certified* if the solver proves every open row infeasible; *falsified* if its
point, clamped to the box and cast to the model's dtype, changes the model's prediction
in a forward pass of the caller's model (the point is kept in the certificate);
*timeout* if the time limit ends first; *not_certified* if the point does not change the
prediction (a tie within the float allowance). The encoding and bounds are computed on a
float64 copy of the model; the judge is the model itself. Columns: ``margin_lb``
(alpha-CROWN's lower bound of the margin), ``margin_min`` (the margin at the
counterexample, where there is one). l2 balls would need a quadratic constraint and are
refused.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import Bounds as VariableBounds
from scipy.optimize import LinearConstraint, milp
from scipy.sparse import csr_array
from torch import nn

from certbench.verifiers.base import (
    Certificate,
    Verdict,
    check_certify_call,
    float_slack,
    register,
    verdict_code,
)
from certbench.verifiers.bound_propagation import Ball, BoundPropagator, TracedNetwork, margin_spec
from certbench.verifiers.bound_propagation.operators import Activation
from certbench.verifiers.bound_propagation.propagation import AlphaOptimiser
from certbench.verifiers.specification import (
    OutputSpec,
    SpecResult,
    SpecVerdict,
    box_center_radius,
)


class MilpEncoding:
    """The MILP encoding of one network on one input box: variables, constraints and the
    affine expression (matrix over the variables, offset) of the network's output."""

    def __init__(self, net: TracedNetwork, lower: np.ndarray, upper: np.ndarray,
                 relu_bounds: dict[int, tuple[np.ndarray, np.ndarray]],
                 signs: dict[int, np.ndarray] | None = None):
        """``signs[node]`` (flat, +1 / -1 / 0) adds s_k z_k >= 0 for every fixed ReLU
        input (a branch-and-bound subdomain); bounds alone only relax such a neuron."""
        d = lower.size
        self.net = net
        self.lb, self.ub, self.integrality = list(lower), list(upper), [0] * d
        rows: list[tuple[dict[int, float], float, float]] = []
        expr: dict[int, tuple[np.ndarray, np.ndarray]] = {0: (np.eye(d), np.zeros(d))}
        pending: list[tuple] = []  # columns are only known at the end: build lazily
        for i, node in enumerate(net.nodes[1:], start=1):
            if isinstance(node.op, Activation):
                m, c = expr[node.inputs[0]]
                lo, hi = relu_bounds[node.inputs[0]]
                for k in np.flatnonzero(signs[node.inputs[0]]) if signs else ():
                    sign = float(signs[node.inputs[0]][k])
                    rows.append((sign * m[k], -sign * c[k], math.inf))
                left, right = node.op.slopes
                m_out, c_out = np.zeros_like(m), np.zeros_like(c)
                for side, slope in ((lo >= 0, right), (hi <= 0, left)):
                    if slope != 0.0:
                        m_out[side], c_out[side] = slope * m[side], slope * c[side]
                for k in np.flatnonzero((lo < 0) & (hi > 0)):
                    y = self._variable(min(left * lo[k], 0.0), right * hi[k], 0)
                    z = self._variable(0.0, 1.0, 1)
                    pending.append((y, z, m[k], c[k], lo[k], hi[k], left, right))
                    m_out = self._widen(m_out, y + 2)
                    m_out[k, :] = 0.0
                    m_out[k, y] = 1.0
                expr[i] = (m_out, c_out)
            else:
                expr[i] = self._affine(node, [expr[j] for j in node.inputs])
        width = len(self.lb)
        for y, z, m_row, c_k, lo_k, hi_k, left, right in pending:
            rows += self._kink_rows(width, y, z, m_row, c_k, lo_k, hi_k, left, right)
        self.constraints = rows
        m, c = expr[net.output]
        self.output = (self._widen(m, width), c)

    @staticmethod
    def _kink_rows(width, y, z, m_row, c_k, lo_k, hi_k, left, right) -> list[tuple]:
        """The big-M rows of y = g(z_pre), z_pre = m.x + c in [l, u], l < 0 < u, for a
        convex piecewise-linear g with slopes (a, b), a <= b, kinked at 0, and the binary
        d (1: z_pre >= 0):

            y >= b z_pre,   y <= a z_pre + (b - a) u d,   y <= b z_pre - (b - a) l (1 - d),
            y >= a z_pre (for ReLU, a = 0, the variable's lower bound 0 says it).

        With d = 1 the rows leave y = b z_pre and z_pre >= 0, with d = 0 y = a z_pre and
        z_pre <= 0 (for a < b), so the program is exact (Tjeng et al. 2019, Sec. 4, for
        ReLU)."""
        row = np.zeros(width)
        row[: m_row.size] = m_row
        rows = []
        a = -right * row  # y - b m.x >= b c
        a[y] += 1.0
        rows.append((a, right * c_k, math.inf))
        a = -left * row if left != 0.0 else np.zeros(width)  # y - a m.x - (b - a) u d <= a c
        a[y], a[z] = 1.0, -(right - left) * hi_k
        rows.append((a, -math.inf, left * c_k))
        a = -right * row  # y - b m.x - (b - a) l d <= b c - (b - a) l
        a[y] += 1.0
        a[z] = -(right - left) * lo_k
        rows.append((a, -math.inf, right * c_k - (right - left) * lo_k))
        if left != 0.0:  # y - a m.x >= a c
            a = -left * row
            a[y] += 1.0
            rows.append((a, left * c_k, math.inf))
        return rows

    def _variable(self, lower: float, upper: float, integer: int) -> int:
        self.lb.append(lower)
        self.ub.append(upper)
        self.integrality.append(integer)
        return len(self.lb) - 1

    @staticmethod
    def _widen(m: np.ndarray, width: int) -> np.ndarray:
        if m.shape[1] >= width:
            return m
        return np.hstack([m, np.zeros((m.shape[0], width - m.shape[1]))])

    def _affine(self, node, inputs) -> tuple[np.ndarray, np.ndarray]:
        """The node as sum_i J_i x_i + c: Jacobians of its (linear) operation, densely."""
        shapes = [self.net.nodes[j].shape for j in node.inputs]
        param = next(self.net.graph_module.parameters(), None)
        device = param.device if param is not None else None
        zeros = [torch.zeros(1, *s, dtype=torch.float64, device=device) for s in shapes]
        with torch.no_grad():
            offset = node.op.forward(*zeros).reshape(-1).cpu().numpy()
        width = max(m.shape[1] for m, _ in inputs)
        m_total = np.zeros((offset.size, width))
        c_total = offset.copy()
        for k, (m, c) in enumerate(inputs):
            def only_k(v, k=k):
                args = [v if j == k else zeros[j] for j in range(len(zeros))]
                return node.op.forward(*args).reshape(-1)
            jac = torch.autograd.functional.jacobian(only_k, zeros[k], vectorize=True)
            jac = jac.reshape(offset.size, -1)
            jac = jac.cpu().numpy()
            m_total += jac @ self._widen(m, width)
            c_total += jac @ c
        return m_total, c_total

    def find_point(self, rows: np.ndarray, offsets: np.ndarray, at_most: float,
                   time_limit: float, deepest: bool = False) -> tuple[str, np.ndarray | None]:
        """A point of the program with rows . v + offsets <= at_most for every row, or a
        proof that none exists. It is a feasibility problem (zero objective): HiGHS stops
        at the first such point instead of minimising the margin to the end, and prunes
        every node whose LP relaxation cannot reach the bound (an objective cutoff).
        Such a first point tends to lie on the bound itself; ``deepest`` minimises the
        sum of the rows instead (to the end), for when that point is too close to call.
        Returns ("found", the point's variables), ("none", None) when infeasible,
        ("timeout", None) or ("unknown", None)."""
        width = len(self.lb)
        objective = np.zeros(width)
        if deepest:
            total = np.sum(rows, axis=0)
            objective[: total.size] = total
        matrix = np.zeros((len(self.constraints) + len(rows), width))
        lower, upper = [], []
        for k, (a, lo, hi) in enumerate(self.constraints):
            matrix[k, : a.size] = a
            lower.append(lo)
            upper.append(hi)
        for k, (a, offset) in enumerate(zip(rows, offsets, strict=True)):
            matrix[len(self.constraints) + k, : a.size] = a
            lower.append(-math.inf)
            upper.append(at_most - float(offset))
        result = milp(
            objective, integrality=np.array(self.integrality),
            bounds=VariableBounds(self.lb, self.ub),
            constraints=[LinearConstraint(csr_array(matrix), lower, upper)],
            options={"time_limit": max(time_limit, 1e-3)},
        )
        if result.x is not None and (result.status == 0 or deepest):
            return "found", result.x
        return {2: "none", 1: "timeout"}.get(result.status, "unknown"), None


@register("exact", "exact l_inf verification of small ReLU networks by MILP (HiGHS)")
class ExactVerifier:
    """Ground truth for small networks; ``time_limit_s`` per sample and epsilon (per
    property in `check_spec`); ``alpha_iterations`` for the alpha-CROWN bounds."""

    name = method = "exact"

    def __init__(self, time_limit_s: float = 60.0, max_binaries: int = 2000,
                 alpha_iterations: int = 20):
        self.time_limit_s = time_limit_s
        self.max_binaries = max_binaries
        self.alpha_iterations = alpha_iterations
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model.eval()  # the judge of counterexamples, in its own precision
        traced = TracedNetwork(copy.deepcopy(model).eval().double(), input_shape)
        self.net = traced.decomposed()  # MinMax: a ReLU between two linear maps
        self.net.check_supported(self.name)
        self.propagator = BoundPropagator(self.net)

    @torch.no_grad()
    def certify(self, x: torch.Tensor, norm: str, eps: Sequence[float]) -> Certificate:
        check_certify_call(self.model, norm)
        if norm != "inf":
            raise ValueError("the exact verifier supports only l_inf balls (l2 needs MIQP)")
        logits = self.model(x)
        prediction = logits.argmax(1)
        spec = margin_spec(prediction, logits.shape[1]).double()
        slack = float_slack(logits)
        verdicts = torch.full((len(x), len(eps)), verdict_code(Verdict.TIMEOUT), dtype=torch.int8)
        margin_lb, margin_at = (torch.full((len(x), len(eps)), math.nan, dtype=torch.float64)
                                for _ in range(2))
        counterexamples = {}
        for n in range(len(x)):
            for k, e in enumerate(eps):
                verdict, margin_lb[n, k], point = self._solve(
                    x[n : n + 1], spec[n : n + 1], float(slack[n]), e)
                verdicts[n, k] = verdict_code(verdict)
                if point is not None:
                    counterexamples[(n, k)] = point
                    out = self.model(point)[0]
                    margin_at[n, k] = float(out[prediction[n]] - out.max())
        return Certificate(prediction=prediction.cpu(), verdicts=verdicts,
                           columns={"margin_lb": margin_lb, "margin_min": margin_at},
                           counterexamples=counterexamples)

    def _bounds(self, ball: Ball, rows: torch.Tensor):
        """alpha-CROWN lower bounds of the rows (1, R, outputs) and the intermediate bounds
        its optimisation tightened (the big-M constants), as flat float64 arrays."""
        prop = self.propagator
        bounds = prop.intermediate_bounds(ball, "crown")
        lower = prop.backward(self.net.output, rows, ball, bounds)
        if self.alpha_iterations > 0:
            optimiser = AlphaOptimiser(prop, rows, ball, bounds, 0.1)
            lower = optimiser.run(lower, self.alpha_iterations)
            bounds = optimiser.reference
        relu_bounds = {i: (lo[0].reshape(-1).cpu().numpy(), hi[0].reshape(-1).cpu().numpy())
                       for i, (lo, hi) in bounds.items()}
        return lower[0], relu_bounds

    def _solve(self, x, spec, slack, eps) -> tuple[Verdict, float, torch.Tensor | None]:
        """The verdict, alpha-CROWN's lower bound of the margin, and a counterexample."""
        started = time.perf_counter()
        ball = Ball(x.double(), eps, "inf")
        bound, relu_bounds = self._bounds(ball, spec)
        if (bound > slack).all():
            return Verdict.CERTIFIED, float(bound.min()), None
        self._check_size(relu_bounds)
        lower, upper = (t[0].reshape(-1).cpu().numpy() for t in ball.box())
        program = MilpEncoding(self.net, lower, upper, relu_bounds)
        m, c = program.output
        for row in torch.argsort(bound).tolist():
            if bound[row] > slack:
                continue
            remaining = self.time_limit_s - (time.perf_counter() - started)
            if remaining <= 0:
                return Verdict.TIMEOUT, float(bound.min()), None
            s = spec[0, row].cpu().numpy()  # a point with margin f_y - f_j <= slack, or none
            found = self._search(program, (s @ m)[None], np.array([float(s @ c)]), slack,
                                 started, lower, upper, x,
                                 lambda p, s=spec[0, row]: self.model(p).argmax(1) != s.argmax())
            status, point = found
            if status == "found":
                if point is not None:
                    return Verdict.FALSIFIED, float(bound.min()), point
                return Verdict.NOT_CERTIFIED, float(bound.min()), None
            if status != "none":
                verdict = Verdict.TIMEOUT if status == "timeout" else Verdict.NOT_CERTIFIED
                return verdict, float(bound.min()), None
        return Verdict.CERTIFIED, float(bound.min()), None

    def _search(self, program, rows, offsets, slack, started, lower, upper, like, confirms):
        """``find_point``, then, if its point does not convince the model (a point on the
        bound), the deepest point within the time left. Returns (status, the confirmed
        counterexample or None)."""
        for deepest in (False, True):
            remaining = self.time_limit_s - (time.perf_counter() - started)
            if remaining <= 0:
                return "timeout", None
            status, solution = program.find_point(rows, offsets, slack, remaining, deepest)
            if status != "found":
                return status, None
            point = self._point(solution, lower, upper, like)
            if bool(confirms(point)):
                return status, point
        return "found", None

    @staticmethod
    def _point(solution, lower, upper, like: torch.Tensor) -> torch.Tensor:
        """The solver's input variables, clamped to the box, in the model's dtype."""
        point = np.clip(solution[: lower.size], lower, upper)
        return torch.from_numpy(point).reshape(like.shape).to(like.dtype)

    def _check_size(self, relu_bounds) -> None:
        unstable = sum(int(((lo < 0) & (hi > 0)).sum()) for lo, hi in relu_bounds.values())
        if unstable > self.max_binaries:
            raise ValueError(
                f"{unstable} unstable ReLUs exceed max_binaries={self.max_binaries}; the exact "
                "verifier is meant for small networks"
            )

    @torch.no_grad()
    def check_spec(self, lower: torch.Tensor, upper: torch.Tensor, spec: OutputSpec,
                   time_limit_s: float) -> SpecResult:
        """Decide a VNN-LIB property exactly: per disjunct not already emptied by
        alpha-CROWN, a point of the box with C_i f(x) - d_i <= the float allowance in
        every row, or the MILP's proof that none exists (the disjunct is empty). A point
        is a counterexample if a forward pass of the model, in its own precision, puts it
        in the unsafe set (the harness then confirms it with onnxruntime).
        ``time_limit_s`` covers the whole property."""
        check_certify_call(self.model, "inf")
        started = time.perf_counter()
        center, radius = box_center_radius(lower, upper, torch.float64)
        ball = Ball(center, radius, "inf", clip=False)
        c_all, d_all, owner = spec.to(torch.float64).stacked()
        dtype = next(self.model.parameters()).dtype
        slack = float(float_slack(self.model(center.to(dtype))))
        bound, relu_bounds = self._bounds(ball, c_all[None])
        open_ = [i for i in range(len(spec.disjuncts))
                 if not bool(((bound - d_all)[owner == i] > slack).any())]
        if not open_:
            return SpecResult(SpecVerdict.UNSAT, columns={"milp_solves": 0})
        self._check_size(relu_bounds)
        box_lower, box_upper = (t.double().reshape(-1).cpu().numpy() for t in (lower, upper))
        program = MilpEncoding(self.net, box_lower, box_upper, relu_bounds)
        m, c = program.output
        for solves, i in enumerate(open_, start=1):
            remaining = time_limit_s - (time.perf_counter() - started)
            if remaining <= 0:
                return SpecResult(SpecVerdict.TIMEOUT, columns={"milp_solves": solves - 1})
            ci = c_all[owner == i].cpu().numpy()
            di = d_all[owner == i].cpu().numpy()
            status, point = self._search(
                program, ci @ m, ci @ c - di, slack, started - self.time_limit_s + time_limit_s,
                box_lower, box_upper, lower.to(dtype),
                lambda p: spec.to(dtype).violation(self.model(p)) <= 0)
            if status == "found":
                if point is not None:
                    return SpecResult(SpecVerdict.SAT, point, {"milp_solves": solves})
                return SpecResult(SpecVerdict.UNKNOWN, columns={"milp_solves": solves})
            if status != "none":
                verdict = SpecVerdict.TIMEOUT if status == "timeout" else SpecVerdict.UNKNOWN
                return SpecResult(verdict, columns={"milp_solves": solves})
        return SpecResult(SpecVerdict.UNSAT, columns={"milp_solves": len(open_)})
