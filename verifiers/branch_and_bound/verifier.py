"""The registered ``bab`` verifier: complete verification of ReLU networks by branch and
bound on the bound-propagation engine (beta-CROWN; Wang et al. 2021).

Per sample and epsilon (or per VNN-LIB property), within ``time_limit_s``:
1. CROWN: if its bounds prove the property, that is the answer (most robust points);
2. falsification: PGD with ``attack_restarts`` restarts in the input set; a point counts
   only if a forward pass of the model confirms it (`certify`: another class wins;
   `check_spec`: the output lies in the unsafe set, then the harness asks onnxruntime);
3. the root: alpha-CROWN (optimised slopes for every intermediate layer and the output,
   ``root_iterations`` Adam steps) on every row of the specification at once; the
   intermediate bounds it tightens are the ones every subdomain keeps;
4. every disjunct of the unsafe set the root leaves open (for robustness: every class
   j with f_y - f_j not proven positive), the worst first, goes through the
   branch-and-bound loop of search.py (``branching``: BaBSR, or filtered smart branching
   which bounds the children of 6 candidate neurons per domain before it splits one;
   batched beta-CROWN bounds, an LP at fully split leaves).

Inputs of at most ``input_split_dims`` coordinates (8 by default), in an l_inf ball or a
VNN-LIB box, skip steps 3-4: each open disjunct goes to input splitting instead
(input_split.py: halve the box along the coordinate of largest smear, batched CROWN per
box), which on such networks needs orders of magnitude fewer domains than ReLU splits.
Inputs of up to ``input_split_probe_dims`` coordinates (32) try input splitting first
as a measured probe: after a fifth of the time, if the share of the box's volume it has
proven, at its rate, would not reach the whole box in time, the rest of the time goes
to steps 3-4 (on VNN-COMP 2022's cifar_biasfield, 16 inputs, at a tenth of its
timeouts: 3 of 5 instances answered by input splitting, 1 by ReLU splitting). The
method column of ``check_spec``'s answer names the split: ``input split``, ``relu
split`` or ``input split, then relu split``.

Verdicts: ``certified`` (every disjunct proven empty), ``falsified`` (a confirmed
counterexample), ``timeout`` (the budget ended first: never ``not_certified``; no PGD
step, Adam step or round starts after it, so a timeout is late by at most one of those), and
``not_certified`` only where the method itself cannot decide (an l2 leaf, or a leaf LP
whose minimiser a float forward pass does not confirm: a numerical tie). Columns per
sample and epsilon: ``bab_domains`` (subdomains bounded), ``bab_depth``,
``bab_lp_leaves``, ``bab_bound_s`` and ``bab_branch_s`` (time bounding vs choosing and
splitting), ``falsify_s`` (the attack).

Networks: linear operations and piecewise-linear activations with one kink at 0 that
declare their ``slopes`` (ReLU, LeakyReLU; others raise UnsupportedLayerError, as each
operation's `refusal` says); l_inf and l2 balls and general linear specifications on
boxes. Splits are at the kink, so each child sees one linear piece; BaBSR's scores are
ReLU's formula for every such activation (a heuristic: any choice stays sound).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
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
from certbench.verifiers.bound_propagation.propagation import AlphaOptimiser, DeadlineExceeded
from certbench.verifiers.branch_and_bound.domains import ALPHA_LR, DomainBounder, Domains
from certbench.verifiers.branch_and_bound.input_split import input_split_search
from certbench.verifiers.branch_and_bound.search import (
    BRANCHING,
    SearchResult,
    SearchStats,
    branch_and_bound,
)
from certbench.verifiers.exact import MilpEncoding
from certbench.verifiers.falsification import box_pgd
from certbench.verifiers.specification import (
    OutputSpec,
    SpecResult,
    SpecVerdict,
    box_center_radius,
)

SPEC_TO_VERDICT = {
    SpecVerdict.UNSAT: Verdict.CERTIFIED,
    SpecVerdict.SAT: Verdict.FALSIFIED,
    SpecVerdict.TIMEOUT: Verdict.TIMEOUT,
    SpecVerdict.UNKNOWN: Verdict.NOT_CERTIFIED,
}


@register("bab", "complete: branch and bound with beta-CROWN bounds (Wang et al. 2021)")
class BranchAndBoundVerifier:
    """See the module docstring. ``batch_size`` domains are split per round (twice as
    many bounded in one pass); ``iterations`` Adam steps on (alpha, beta) per round."""

    name = method = "bab"

    def __init__(self, time_limit_s: float = 60.0, batch_size: int = 1024,
                 iterations: int = 10, root_iterations: int = 20,
                 attack_restarts: int = 8, attack_steps: int = 50,
                 input_split_dims: int = 8, input_split_probe_dims: int = 32,
                 branching: str = "babsr"):
        if time_limit_s <= 0 or batch_size < 1:
            raise ValueError("time_limit_s and batch_size must be positive")
        if branching not in BRANCHING:
            raise ValueError(f"branching must be one of {BRANCHING}, got {branching!r}")
        self.branching = branching
        self.time_limit_s = time_limit_s
        self.batch_size = batch_size
        self.iterations, self.root_iterations = iterations, root_iterations
        self.attack_restarts, self.attack_steps = attack_restarts, attack_steps
        self.input_split_dims = input_split_dims
        self.input_split_probe_dims = input_split_probe_dims
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model.eval()
        self.input_shape = tuple(input_shape)
        net = TracedNetwork(model, input_shape).decomposed()  # MinMax: splits on its ReLU
        net.check_supported("bab")
        self.propagator = BoundPropagator(net)
        self._net64: TracedNetwork | None = None  # for leaf LPs, built on first use

    @torch.no_grad()
    def certify(self, x: torch.Tensor, norm: str, eps: Sequence[float]) -> Certificate:
        check_certify_call(self.model, norm)
        logits = self.model(x)
        prediction = logits.argmax(1)
        slack = float_slack(logits)
        verdicts = torch.full((len(x), len(eps)), verdict_code(Verdict.TIMEOUT),
                              dtype=torch.int8)
        columns: dict[str, torch.Tensor] = {}
        counterexamples: dict[tuple[int, int], torch.Tensor] = {}
        for n in range(len(x)):
            c = margin_spec(prediction[n : n + 1], logits.shape[1])[0].to(x.dtype)
            spec = OutputSpec(tuple((row[None], torch.zeros(1, dtype=x.dtype)) for row in c))
            label = int(prediction[n])

            def confirm(points: torch.Tensor, label=label) -> torch.Tensor | None:
                wrong = (self.model(points).argmax(1) != label).nonzero().flatten()
                return points[wrong[:1]] if len(wrong) else None

            point: torch.Tensor | None = None
            for k in sorted(range(len(eps)), key=lambda k: eps[k]):
                if point is not None:  # the counterexample lies in every larger ball
                    verdicts[n, k] = verdict_code(Verdict.FALSIFIED)
                    counterexamples[(n, k)] = point
                    continue
                ball = Ball(x[n : n + 1], eps[k], norm)
                result, attack_s = self._decide(ball, spec, float(slack[n]), confirm,
                                                time.perf_counter() + self.time_limit_s)
                verdicts[n, k] = verdict_code(SPEC_TO_VERDICT[result.verdict])
                if result.verdict == SpecVerdict.SAT:
                    point = counterexamples[(n, k)] = result.counterexample
                values = {**result.stats.columns(), "falsify_s": attack_s}
                for name, value in values.items():
                    columns.setdefault(name, torch.full((len(x), len(eps)), math.nan,
                                                        dtype=torch.float64))[n, k] = value
        return Certificate(prediction=prediction.cpu(), verdicts=verdicts, columns=columns,
                           counterexamples=counterexamples)

    @torch.no_grad()
    def check_spec(self, lower: torch.Tensor, upper: torch.Tensor, spec: OutputSpec,
                   time_limit_s: float) -> SpecResult:
        """Decide a VNN-LIB property on the box [lower, upper] within ``time_limit_s``."""
        check_certify_call(self.model, "inf")
        deadline = time.perf_counter() + time_limit_s
        param = next(self.model.parameters())
        center, radius = (t.to(param.device) for t in box_center_radius(lower, upper, param.dtype))
        ball = Ball(center, radius, "inf", clip=False)
        spec = spec.to(param.dtype, param.device)
        slack = float(float_slack(self.model(center)))

        def confirm(points: torch.Tensor) -> torch.Tensor | None:
            inside = (spec.violation(self.model(points)) <= 0).nonzero().flatten()
            return points[inside[:1]] if len(inside) else None

        result, attack_s = self._decide(ball, spec, slack, confirm, deadline)
        columns = {**result.stats.columns(), "falsify_s": attack_s}
        return SpecResult(result.verdict, result.counterexample, columns,
                          method=f"bab: {result.method}" if result.method else None)

    # -- one property ---------------------------------------------------------------
    def _decide(self, ball: Ball, spec: OutputSpec, slack: float, confirm,
                deadline: float) -> tuple[SearchResult, float]:
        """Falsify, bound the root, then branch on each open disjunct (module docstring).
        Returns the result and the time spent attacking. A CROWN pass that reaches the
        deadline stops between chunks of rows (the propagator's ``deadline``): timeout."""
        self.propagator.deadline = deadline
        try:
            return self._decide_within(ball, spec, slack, confirm, deadline)
        except DeadlineExceeded:
            return SearchResult(SpecVerdict.TIMEOUT), 0.0
        finally:
            self.propagator.deadline = math.inf

    def _decide_within(self, ball: Ball, spec: OutputSpec, slack: float, confirm,
                       deadline: float) -> tuple[SearchResult, float]:
        prop = self.propagator
        c_all, d_all, owner = spec.stacked()
        t0 = time.perf_counter()
        bounds = prop.intermediate_bounds(ball, "crown")
        best = prop.backward(prop.net.output, c_all[None], ball, bounds)
        crown_s = time.perf_counter() - t0
        stats = SearchStats(domains=1, bound_s=crown_s)
        if spec.proves_safe(best[0], slack):
            return SearchResult(SpecVerdict.UNSAT, stats=stats), 0.0
        if time.perf_counter() > deadline:
            return SearchResult(SpecVerdict.TIMEOUT, stats=stats), 0.0

        t0 = time.perf_counter()
        lower, upper = ball.box()
        l2 = ball.norm == "2"
        point, value = box_pgd(
            self.model, lower, upper, spec.violation, self.attack_steps,
            self.attack_restarts, center=ball.center if l2 else None,
            radius=float(ball.eps) if l2 else None, deadline=deadline)
        attack_s = time.perf_counter() - t0
        found = confirm(point) if value <= 0 else None
        if found is not None:
            return SearchResult(SpecVerdict.SAT, found, stats), attack_s
        if time.perf_counter() > deadline:
            return SearchResult(SpecVerdict.TIMEOUT, stats=stats), attack_s

        dims = ball.center[0].numel()
        if ball.norm == "inf" and dims <= max(self.input_split_dims, self.input_split_probe_dims):
            result = self._split_input(ball, spec, best[0] - d_all, owner, slack, confirm,
                                       deadline, stats, probe=dims > self.input_split_dims)
            if not result.abandoned:
                result.method = "input split"
                return result, attack_s
            method = "input split, then relu split"
        else:
            method = "relu split"
        t0 = time.perf_counter()
        optimiser = AlphaOptimiser(prop, c_all[None], ball, bounds, ALPHA_LR)
        threshold = torch.full((1,), slack + float(d_all.max()), dtype=best.dtype,
                               device=best.device)
        best = optimiser.run(best, self.root_iterations, threshold, deadline)[0]
        stats.bound_s += time.perf_counter() - t0
        gaps = [float((best - d_all)[owner == i].max()) for i in range(len(spec.disjuncts))]
        for i in sorted(range(len(gaps)), key=gaps.__getitem__):
            if gaps[i] > slack:
                continue
            if time.perf_counter() > deadline:
                return SearchResult(SpecVerdict.TIMEOUT, stats=stats), attack_s
            rows = (owner == i).nonzero().flatten()
            result = self._search(optimiser, ball, spec.disjuncts[i], rows, gaps[i], slack,
                                  deadline, confirm)
            stats.add(result.stats)
            if result.verdict != SpecVerdict.UNSAT:
                result.stats, result.method = stats, method
                return result, attack_s
        return SearchResult(SpecVerdict.UNSAT, stats=stats, method=method), attack_s

    def _split_input(self, ball: Ball, spec: OutputSpec, gaps: torch.Tensor,
                     owner: torch.Tensor, slack: float, confirm, deadline: float,
                     stats: SearchStats, probe: bool) -> SearchResult:
        """Input splitting on each disjunct CROWN's root bound (``gaps``, per row) leaves
        open, the worst first; with ``probe``, abandoned (``result.abandoned``) where its
        measured rate would not finish in the time left (input_split.hopeless)."""
        lower, upper = ball.box()
        worst = [float(gaps[owner == i].max()) for i in range(len(spec.disjuncts))]
        for i in sorted(range(len(worst)), key=worst.__getitem__):
            if worst[i] > slack:
                continue
            c, d = spec.disjuncts[i]
            result = input_split_search(self.propagator, lower, upper, c, d, slack,
                                        deadline, confirm, self.batch_size, probe)
            stats.add(result.stats)
            if result.verdict != SpecVerdict.UNSAT:
                result.stats = stats
                return result
        return SearchResult(SpecVerdict.UNSAT, stats=stats)

    def _search(self, root: AlphaOptimiser, ball: Ball, disjunct, rows, gap, slack, deadline,
                confirm) -> SearchResult:
        """Branch and bound on one disjunct (``rows`` of the stacked specification), from
        the root's tightened intermediate bounds and output slopes."""
        prop = self.propagator
        c, d = disjunct
        out = prop.net.output
        lower = {i: b[0].clone() for i, b in root.reference.items()}
        upper = {i: b[1].clone() for i, b in root.reference.items()}
        domain = Domains(
            lower=lower, upper=upper,
            signs={i: torch.zeros_like(v, dtype=torch.int8) for i, v in lower.items()},
            alphas={a: p[:, rows].detach().clone() for a, p in root.alphas[out].items()},
            betas={i: v.new_zeros(1, len(rows), *v.shape[1:]) for i, v in lower.items()},
            value=torch.tensor([gap], dtype=c.dtype, device=c.device),
            depth=torch.zeros(1, dtype=torch.long, device=c.device),
            branch=torch.full((1, 2), -1, dtype=torch.long, device=c.device),
        )
        bounder = DomainBounder(prop, ball, c, d)
        t0 = time.perf_counter()
        coefficients = bounder.bound(domain, 0, slack)
        root_s = time.perf_counter() - t0
        leaf = self._leaf_lp(ball, c, d, slack, deadline, confirm) if ball.norm == "inf" else None
        result = branch_and_bound(
            bounder, domain, coefficients, slack, deadline, confirm, leaf,
            self.batch_size, self.iterations, self.branching)
        result.stats.bound_s += root_s
        return result

    def _leaf_lp(self, ball, c, d, slack, deadline, confirm):
        """The exact decision of a fully split domain over a box: the network is affine
        on it, so whether some input with the domain's split signs has every
        c_r . f(x) - d_r <= the float allowance is an LP (the MILP encoding with no
        binary left), decided by HiGHS in float64."""
        if self._net64 is None:
            self._net64 = TracedNetwork(copy.deepcopy(self.model).double(),
                                        self.input_shape).decomposed()
        box_lower, box_upper = (t[0].double().cpu().reshape(-1).numpy() for t in ball.box())
        c64, d64 = c.double().cpu().numpy(), d.double().cpu().numpy()

        def decide(domain: Domains):
            relu_bounds = {i: (domain.lower[i][0].double().cpu().reshape(-1).numpy(),
                               domain.upper[i][0].double().cpu().reshape(-1).numpy())
                           for i in domain.lower}
            signs = {i: s[0].cpu().reshape(-1).numpy() for i, s in domain.signs.items()}
            program = MilpEncoding(self._net64, box_lower, box_upper, relu_bounds, signs)
            m, offset = program.output
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return SpecVerdict.TIMEOUT, None
            status, solution = program.find_point(c64 @ m, c64 @ offset - d64, slack, remaining)
            if status == "none":  # no input with this activation pattern reaches the bound
                return SpecVerdict.UNSAT, None
            if status != "found":
                return SpecVerdict.TIMEOUT if status == "timeout" else SpecVerdict.UNKNOWN, None
            point = np.clip(solution[: box_lower.size], box_lower, box_upper)
            found = confirm(torch.from_numpy(point).reshape(ball.center.shape).to(ball.center))
            return (SpecVerdict.SAT, found) if found is not None else (SpecVerdict.UNKNOWN, None)

        return decide
