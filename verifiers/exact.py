"""Exact verification of small ReLU networks by mixed-integer linear programming.

For the predicted class y and each j != y, the exact minimum of f_y(x) - f_j(x) over the
l_inf ball intersected with [0, 1]^d is found with scipy's HiGHS MILP solver (Tjeng,
Xiao and Tedrake 2019, "Evaluating robustness of neural networks with mixed integer
programming", Sec. 4). Every linear operation of the traced graph becomes a dense affine
map; a ReLU y = max(z, 0) with pre-activation bounds l < 0 < u (CROWN's, from the
bound-propagation engine) gets one binary d and the big-M constraints

    y >= 0,  y >= z,  y <= u d,  y <= z - l (1 - d);

stable ReLUs are replaced by z or 0. Rows whose CROWN bound is already positive are
skipped (they are certified), the others are solved lowest CROWN bound first.

Verdicts: *certified* if every row's proven lower bound (the solver's dual bound) exceeds
the float allowance; *falsified* if a solution has a negative margin and a float32
forward pass of the model at that point confirms a different prediction (the point is
kept); *timeout* if the time limit ends first; *not_certified* if the solver's
counterexample does not survive the forward pass (a numerical tie). l2 balls would need
a quadratic constraint and are refused.
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
    UnsupportedLayerError,
    Verdict,
    check_certify_call,
    float_slack,
    register,
    verdict_code,
)
from certbench.verifiers.bound_propagation import Ball, BoundPropagator, TracedNetwork, margin_spec
from certbench.verifiers.bound_propagation.operators import Relu
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
            if isinstance(node.op, Relu):
                m, c = expr[node.inputs[0]]
                lo, hi = relu_bounds[node.inputs[0]]
                for k in np.flatnonzero(signs[node.inputs[0]]) if signs else ():
                    sign = float(signs[node.inputs[0]][k])
                    rows.append((sign * m[k], -sign * c[k], math.inf))
                m_out, c_out = np.zeros_like(m), np.zeros_like(c)
                active = lo >= 0
                m_out[active], c_out[active] = m[active], c[active]
                for k in np.flatnonzero((lo < 0) & (hi > 0)):
                    y, z = self._variable(0.0, hi[k], 0), self._variable(0.0, 1.0, 1)
                    pending.append((y, z, m[k], c[k], lo[k], hi[k]))
                    m_out = self._widen(m_out, y + 2)
                    m_out[k, :] = 0.0
                    m_out[k, y] = 1.0
                expr[i] = (m_out, c_out)
            else:
                expr[i] = self._affine(node, [expr[j] for j in node.inputs])
        width = len(self.lb)
        for y, z, m_row, c_k, lo_k, hi_k in pending:
            row = np.zeros(width)
            row[: m_row.size] = m_row
            # y - z_pre >= 0  ->  y - m.x >= c
            a = -row.copy()
            a[y] += 1.0
            rows.append((a, c_k, math.inf))
            # y <= u d  ->  y - u d <= 0
            a = np.zeros(width)
            a[y], a[z] = 1.0, -hi_k
            rows.append((a, -math.inf, 0.0))
            # y <= z_pre - l (1 - d)  ->  y - m.x - l d <= c - l
            a = -row.copy()
            a[y] += 1.0
            a[z] = -lo_k
            rows.append((a, -math.inf, c_k - lo_k))
        self.constraints = rows
        m, c = expr[net.output]
        self.output = (self._widen(m, width), c)

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
        zeros = [torch.zeros(1, *s, dtype=torch.float64) for s in shapes]
        with torch.no_grad():
            offset = node.op.forward(*zeros).reshape(-1).numpy()
        width = max(m.shape[1] for m, _ in inputs)
        m_total = np.zeros((offset.size, width))
        c_total = offset.copy()
        for k, (m, c) in enumerate(inputs):
            def only_k(v, k=k):
                args = [v if j == k else zeros[j] for j in range(len(zeros))]
                return node.op.forward(*args).reshape(-1)
            jac = torch.autograd.functional.jacobian(only_k, zeros[k], vectorize=True)
            jac = jac.reshape(offset.size, -1)
            jac = jac.numpy()
            m_total += jac @ self._widen(m, width)
            c_total += jac @ c
        return m_total, c_total

    def minimise_max(self, objectives: np.ndarray, offsets: np.ndarray, time_limit: float):
        """min of max_j (objectives[j] . v + offsets[j]) over the program; several rows go
        through an epigraph variable t (rows . v - t <= -offset_j, minimise t). Returns
        the solver's result (``x`` cut to the program's variables), the value of the
        maximum at ``x`` (None without a solution) and its proven lower bound (the dual
        bound; None if the solver gave none), offsets included."""
        width = len(self.lb)
        k = len(objectives)
        lb, ub, integrality = list(self.lb), list(self.ub), list(self.integrality)
        rows = [(np.pad(r[0], (0, max(0, width + (k > 1) - r[0].size))), r[1], r[2])
                for r in self.constraints]
        c = np.zeros(width + (k > 1))
        if k == 1:
            c[: objectives.shape[1]] = objectives[0]
            shift = float(offsets[0])
        else:
            lb.append(-math.inf)
            ub.append(math.inf)
            integrality.append(0)
            for objective, offset in zip(objectives, offsets, strict=True):
                a = np.zeros(width + 1)
                a[: objective.size] = objective
                a[width] = -1.0
                rows.append((a, -math.inf, -float(offset)))
            c[width] = 1.0
            shift = 0.0
        constraints = []
        if rows:
            matrix = csr_array(np.array([r[0] for r in rows]))
            constraints = [LinearConstraint(matrix, [r[1] for r in rows], [r[2] for r in rows])]
        result = milp(
            c, integrality=np.array(integrality), bounds=VariableBounds(lb, ub),
            constraints=constraints, options={"time_limit": max(time_limit, 1e-3)},
        )
        dual = getattr(result, "mip_dual_bound", None)
        if result.status == 0 and dual is None:
            dual = result.fun
        if result.x is None:
            return result, None, None if dual is None else dual + shift
        result.x = result.x[:width]
        return result, result.fun + shift, None if dual is None else dual + shift


@register("exact", "exact l_inf verification of small ReLU networks by MILP (HiGHS)")
class ExactVerifier:
    """Ground truth for small networks; ``time_limit_s`` per sample and epsilon."""

    name = method = "exact"

    def __init__(self, time_limit_s: float = 60.0, max_binaries: int = 2000):
        self.time_limit_s = time_limit_s
        self.max_binaries = max_binaries
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = copy.deepcopy(model).eval().double()  # the caller's model stays float32
        self.net = TracedNetwork(self.model, input_shape)
        for node in self.net.nodes[1:]:
            if not node.op.linear and not isinstance(node.op, Relu):
                raise UnsupportedLayerError(
                    f"the exact verifier has no MILP encoding for {type(node.op).__name__} "
                    f"(node {node.name!r}): it encodes linear operations and ReLU only"
                )
        self.propagator = BoundPropagator(self.net)
        self.counterexamples: dict[tuple[int, int], torch.Tensor] = {}

    @torch.no_grad()
    def certify(self, x: torch.Tensor, norm: str, eps: Sequence[float]) -> Certificate:
        check_certify_call(self.model, norm)
        if norm != "inf":
            raise ValueError("the exact verifier supports only l_inf balls (l2 needs MIQP)")
        x = x.double()
        logits = self.model(x)
        prediction = logits.argmax(1)
        spec = margin_spec(prediction, logits.shape[1]).double()
        slack = float_slack(logits)
        verdicts = torch.full((len(x), len(eps)), verdict_code(Verdict.TIMEOUT), dtype=torch.int8)
        minimum = torch.full((len(x), len(eps)), math.nan, dtype=torch.float64)
        self.counterexamples = {}
        for n in range(len(x)):
            for k, e in enumerate(eps):
                verdict, value, point = self._solve(
                    x[n : n + 1], spec[n : n + 1], float(slack[n]), e
                )
                verdicts[n, k], minimum[n, k] = verdict_code(verdict), value
                if point is not None:
                    self.counterexamples[(n, k)] = point.float()
        return Certificate(prediction=prediction.cpu(), verdicts=verdicts,
                           columns={"margin_min": minimum})

    def _solve(self, x, spec, slack, eps) -> tuple[Verdict, float, torch.Tensor | None]:
        """The verdict, the minimum margin found (or proven), and a counterexample."""
        started = time.perf_counter()
        ball = Ball(x, eps, "inf")
        bounds = self.propagator.intermediate_bounds(ball, "crown")
        crown = self.propagator.backward(self.net.output, spec, ball, bounds)[0]
        if (crown > slack).all():
            return Verdict.CERTIFIED, float(crown.min()), None
        relu_bounds = {i: (lo[0].reshape(-1).numpy(), hi[0].reshape(-1).numpy())
                       for i, (lo, hi) in bounds.items()}
        self._check_size(relu_bounds)
        lower, upper = (t[0].reshape(-1).numpy() for t in ball.box())
        program = MilpEncoding(self.net, lower, upper, relu_bounds)
        m, c = program.output
        proven = math.inf
        for row in torch.argsort(crown).tolist():
            if crown[row] > slack:
                proven = min(proven, float(crown[row]))
                continue
            remaining = self.time_limit_s - (time.perf_counter() - started)
            if remaining <= 0:
                return Verdict.TIMEOUT, math.nan, None
            s = spec[0, row].numpy()
            result, value, dual = program.minimise_max(
                (s @ m)[None], np.array([float(s @ c)]), remaining)
            if value is not None and value < 0:
                point = torch.from_numpy(result.x[: lower.size]).reshape(x.shape)
                point = point.clamp(torch.from_numpy(lower).reshape(x.shape),
                                    torch.from_numpy(upper).reshape(x.shape))
                if self.model(point).argmax(1) != spec[0, row].argmax():
                    return Verdict.FALSIFIED, value, point
                return Verdict.NOT_CERTIFIED, value, None
            if dual is None or dual <= slack:
                verdict = Verdict.TIMEOUT if result.status == 1 else Verdict.NOT_CERTIFIED
                return verdict, math.nan, None
            proven = min(proven, dual)
        return Verdict.CERTIFIED, proven, None

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
        """Decide a VNN-LIB property exactly: per disjunct not already emptied by CROWN,
        the MILP minimum of max_j (C_j f(x) - d_j) over the box; above the float allowance
        the disjunct is empty, at or below 0 its solution is a counterexample if a float64
        forward pass of the model puts it in the unsafe set (the harness then confirms it
        with onnxruntime). ``time_limit_s`` covers the whole property."""
        check_certify_call(self.model, "inf")
        started = time.perf_counter()
        center, radius = box_center_radius(lower, upper, torch.float64)
        ball = Ball(center, radius, "inf", clip=False)
        spec = spec.to(torch.float64)
        c_all, d_all, owner = spec.stacked()
        slack = float(float_slack(self.model(center)))
        bounds = self.propagator.intermediate_bounds(ball, "crown")
        crown = self.propagator.backward(self.net.output, c_all[None], ball, bounds)[0]
        open_ = [i for i in range(len(spec.disjuncts))
                 if not bool(((crown - d_all)[owner == i] > slack).any())]
        if not open_:
            return SpecResult(SpecVerdict.UNSAT, columns={"milp_solves": 0})
        relu_bounds = {i: (lo[0].reshape(-1).numpy(), hi[0].reshape(-1).numpy())
                       for i, (lo, hi) in bounds.items()}
        self._check_size(relu_bounds)
        box_lower, box_upper = (t.double().reshape(-1).numpy() for t in (lower, upper))
        program = MilpEncoding(self.net, box_lower, box_upper, relu_bounds)
        m, c = program.output
        for solves, i in enumerate(open_, start=1):
            remaining = time_limit_s - (time.perf_counter() - started)
            if remaining <= 0:
                return SpecResult(SpecVerdict.TIMEOUT, columns={"milp_solves": solves - 1})
            ci, di = (t.numpy() for t in spec.disjuncts[i])
            result, value, dual = program.minimise_max(ci @ m, ci @ c - di, remaining)
            if value is not None and value <= 0:
                point = torch.from_numpy(result.x[: box_lower.size]).reshape(lower.shape)
                point = point.clamp(lower.double(), upper.double())
                if spec.violation(self.model(point)) <= 0:
                    return SpecResult(SpecVerdict.SAT, point, {"milp_solves": solves})
                return SpecResult(SpecVerdict.UNKNOWN, columns={"milp_solves": solves})
            if dual is None or dual <= slack:
                verdict = SpecVerdict.TIMEOUT if result.status == 1 else SpecVerdict.UNKNOWN
                return SpecResult(verdict, columns={"milp_solves": solves})
        return SpecResult(SpecVerdict.UNSAT, columns={"milp_solves": len(open_)})
