"""Interval and linear bound propagation over a traced network.

- IBP (Gowal et al. 2018): intervals pushed forward node by node.
- CROWN (Zhang et al. 2018, Sec. 3): a linear lower bound of spec . f(x) built backward
  from the output, each activation replaced by its linear relaxation given the bounds of
  its input; those intermediate bounds come from CROWN itself, node by node in
  topological order, so each backward pass only meets activations already bounded.
- CROWN-IBP (Zhang et al. 2020, Sec. 3.2): intermediate bounds from IBP, the final bound
  by the CROWN backward pass.
- alpha-CROWN (Xu et al. 2021, "Fast and Complete", Sec. 3.1): the lower slopes of
  unstable ReLUs are free parameters in [0, 1], one set per bounded node (every
  intermediate layer and the output, as in the paper), optimised jointly by Adam on the
  sum of the output bounds (Eq. 7); the intermediate bounds are recomputed with their
  own slopes at every step, so gradients reach them through the relaxations they shape.
  Every slope in [0, 1] gives a sound bound, so the best bound seen is kept per neuron
  and per specification row (never looser than CROWN, where it starts).

Where the time goes, and what is done about it (measured against auto_LiRPA 0.7):
- intermediate bounds are computed only for neurons that IBP (or the previous bound)
  leaves unstable, per sample, not for the union over the batch;
- the first step of each intermediate pass reads the rows of the bounded layer off its
  weights (`Operation.backward_rows`) instead of transposing a one-hot tensor, as
  windows where the layer is a convolution or a BatchNorm after one (patches.py);
- a node that is one affine layer of the input (behind elementwise maps only) is bounded
  exactly by IBP over an l_inf box, and exactly in closed form over an l2 ball; no
  backward pass is spent on it;
- alpha-CROWN keeps an intermediate row's slopes only on the window its coefficients
  reach at each activation (patches.py), not on the whole feature map: on the zoo's
  2C2F networks (l2, 8 MNIST points, 5 steps) 2.6-2.7x less time for the same bounds
  (`test_alpha_crown_l2_on_a_zoo_network`), where zero-filled gradients of whole-map
  slopes took most of it;
- a residual Sum's rows start as 1 x 1 windows on both branches, and the branches'
  windows join at the block's input (`Patches.join`) instead of going dense there:
  on a CIFAR-sized BatchNorm ResNet block (the speed suite's ``resnet-bn-cifar``, one
  point) CROWN 19.7x and alpha-CROWN 7.7x faster, the same bounds; on VNN-COMP 2022's
  sri_resnet_a, whose windows reach 7 x 7 on 8 x 8 maps, 0.92x (dense would do there).

The input set is an l_inf or l2 ball around x0 intersected with the [0, 1] box.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certbench.verifiers.bound_propagation.graph import TracedNetwork
from certbench.verifiers.bound_propagation.operators import (
    Conv,
    Dense,
    Elementwise,
    Relu,
    Reshape,
    unstable_rows,
)
from certbench.verifiers.bound_propagation.patches import Patches, rowdot, rowsum

Bounds = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Ball:
    """{x : ||x - center||_p <= eps} intersected with [0, 1]^d (if ``clip``).

    ``eps`` is a float, a (batch,) tensor (one radius per sample, for bisection) or, for
    l_inf, a tensor of the centre's shape (one radius per coordinate: any input box)."""

    center: torch.Tensor
    eps: float | torch.Tensor
    norm: str
    clip: bool = True

    def _eps(self) -> torch.Tensor:
        eps = torch.as_tensor(self.eps, dtype=self.center.dtype, device=self.center.device)
        if eps.shape == self.center.shape and eps.dim() > 1:
            if self.norm != "inf":
                raise ValueError("a radius per coordinate is an l_inf box; use norm 'inf'")
            return eps
        return eps.reshape(-1, *([1] * (self.center.dim() - 1)))

    def subset(self, samples: torch.Tensor) -> Ball:
        eps = self.eps
        if torch.is_tensor(eps) and eps.dim() > 0 and len(eps) == len(self.center):
            eps = eps[samples]
        return Ball(self.center[samples], eps, self.norm, self.clip)

    def box(self) -> Bounds:
        """An axis-aligned box containing the set (exactly the set for l_inf)."""
        eps = self._eps()
        lower, upper = self.center - eps, self.center + eps
        if self.clip:
            lower, upper = lower.clamp(min=0.0), upper.clamp(max=1.0)
        return lower, upper

    def concretize(self, a: torch.Tensor | Patches) -> torch.Tensor:
        """min over the set of sum(a[b, r] * x), for a of shape (batch, rows, *input);
        a ball of one sample serves coefficients of any batch (one set for all rows, as
        for branch and bound's subdomains)."""
        if isinstance(a, Patches):
            return self._concretize_patches(a)
        flat = a.flatten(2)
        lower, upper = self.box()
        mid, rad = ((upper + lower) / 2).flatten(1), ((upper - lower) / 2).flatten(1)
        over_box = rowdot(flat, mid) - rowdot(flat.abs(), rad)
        if self.norm == "inf":
            return over_box
        eps = self._eps().reshape(-1, 1)
        over_ball = rowdot(flat, self.center.flatten(1)) - eps * flat.norm(dim=2)
        # the set lies in both the ball and the box, so both minima are lower bounds
        return torch.maximum(over_ball, over_box) if self.clip else over_ball


    def _concretize_patches(self, a: Patches) -> torch.Tensor:
        lower, upper = self.box()
        mid, rad = a.gather((upper + lower) / 2), a.gather((upper - lower) / 2)
        over_box = rowsum(a.values * mid) - rowsum(a.values.abs() * rad)
        if self.norm == "inf":
            return over_box
        eps = self._eps().reshape(-1, 1)
        over_ball = rowsum(a.values * a.gather(self.center)) - eps * a.values.flatten(2).norm(
            dim=2)
        return torch.maximum(over_ball, over_box) if self.clip else over_ball


def _scatter_rows(full: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                  values: torch.Tensor) -> torch.Tensor:
    """``full`` (batch, *shape) with the valid rows of ``values`` (batch, R) written at
    their flat ``index``; differentiable in ``values``."""
    flat = full.flatten(1)
    spill = flat.shape[1]  # padding rows write into one extra column, then dropped
    target = torch.cat([flat, flat[:, :1]], 1)
    target = target.scatter(1, torch.where(valid, index, spill), values)
    return target[:, :spill].reshape(full.shape)


def _both_signs(a: torch.Tensor | Patches) -> torch.Tensor | Patches:
    """Rows a then -a (lower and upper bounds of the same neurons)."""
    if isinstance(a, Patches):
        return Patches(torch.cat([a.values, -a.values], 1), a.top.repeat(1, 2),
                       a.left.repeat(1, 2), a.shape)
    return torch.cat([a, -a], 1)


def _add(a, b):
    """Sum of two coefficient sets (residual connections): windows where both are
    windows that join (`Patches.join`), dense otherwise."""
    if isinstance(a, Patches) and isinstance(b, Patches):
        joined = a.join(b)
        if joined is not None:
            return joined
    a = a.to_dense() if isinstance(a, Patches) else a
    return a + (b.to_dense() if isinstance(b, Patches) else b)


class DeadlineExceeded(Exception):
    """Raised between chunks of CROWN's backward passes once ``BoundPropagator.deadline``
    (`time.perf_counter`) has passed: a caller with a budget (bab) answers timeout."""


FORWARD_MAX_INPUTS = 32
"""Inputs of at most this many coordinates also get forward-mode bounds (n + 1 linear
functions per neuron) intersected into CROWN's intervals: cheap there, and tighter than
CROWN on some neurons (ACAS Xu, 5 inputs, 256 boxes: the sum of the output bounds -2398
before, -2365 with them; 0.11 s and 0.14 s)."""


class BoundPropagator:
    """IBP, CROWN, CROWN-IBP and alpha-CROWN lower bounds on spec . f(x) over a Ball.

    ``memory_budget_bytes`` caps the coefficient tensors of one backward pass: the rows of
    an intermediate node are processed in chunks that fit. ``deadline``: no chunk of an
    intermediate node's rows starts after it (`DeadlineExceeded`; infinite by default).
    """

    def __init__(self, network: TracedNetwork, memory_budget_bytes: int = 64 << 20):
        self.net = network
        self.memory_budget_bytes = memory_budget_bytes
        self.deadline = math.inf
        self._widest_row = 1  # elements of one row's coefficients, widest in the last walk
        self._placements: dict[tuple, dict[int, Patches]] = {}  # `window_placements`
        self.activations = [i for i, node in enumerate(network.nodes) if node.op is not None
                            and not node.op.linear]
        self.relu_inputs = [network.nodes[i].inputs[0] for i in self.activations]
        self.activation_of = {network.nodes[i].inputs[0]: network.nodes[i].op
                              for i in self.activations}
        self.affine: set[int] = set()  # nodes that are affine functions of the input
        # for nodes on a single-input linear chain from the input: how many of its layers
        # are not diagonal (elementwise maps and reshapes map a box onto a box exactly)
        self.layers: dict[int, int] = {0: 0}
        for i, node in enumerate(network.nodes):
            if i == 0:
                self.affine.add(0)
                continue
            if node.op.linear and all(j in self.affine for j in node.inputs):
                self.affine.add(i)
            if node.op.linear and len(node.inputs) == 1 and node.inputs[0] in self.layers:
                diagonal = isinstance(node.op, (Elementwise, Reshape))
                self.layers[i] = self.layers[node.inputs[0]] + (0 if diagonal else 1)

    # -- forward and intervals -------------------------------------------------------
    def ibp(self, ball: Ball, refine=None) -> list[Bounds]:
        """Interval bounds of every node. For an l2 ball the inputs of the first ReLUs,
        affine in the input, are bounded exactly (w.x0 -+ eps ||w||, the backward pass
        without relaxations) rather than through the ball's bounding box, as auto_LiRPA
        does; the two intervals are intersected. ``refine(i, interval)``, where given,
        replaces each activation input's interval before later nodes use it (CROWN's
        tighter bounds: the next layer's interval then starts from them)."""
        bounds: list[Bounds] = []
        for i, node in enumerate(self.net.nodes):
            if i == 0:
                bounds.append(ball.box())
                continue
            lower, upper = node.op.ibp(*[bounds[j] for j in node.inputs])
            if ball.norm != "inf" and i in self.affine and i in self.relu_inputs:
                exact = self._l2_first_layer(i, ball)
                exact_lower, exact_upper = exact if exact else self.node_bounds(i, ball, {})
                lower, upper = torch.maximum(lower, exact_lower), torch.minimum(upper, exact_upper)
            if refine is not None and i in self.activation_of:
                lower, upper = refine(i, (lower, upper))
            bounds.append((lower, upper))
        return bounds

    def _l2_first_layer(self, target: int, ball: Ball) -> Bounds | None:
        """Exact bounds of an affine node over the l2 ball (no box) in one forward pass,
        when the node is a Dense or Conv layer after elementwise affine maps and reshapes
        only (the normalisation layer): each row of the composed map is W with columns
        scaled by s, so its squared norm is (W*W) applied to s*s. None for other chains,
        which take the backward pass."""
        chain, i = [], target
        while i != 0:
            node = self.net.nodes[i]
            if len(node.inputs) != 1:
                return None
            chain.append(node.op)
            i = node.inputs[0]
        chain.reverse()
        *pre, layer = chain
        if not isinstance(layer, (Dense, Conv)) or not all(
            isinstance(op, (Elementwise, Reshape)) for op in pre
        ):
            return None
        center = ball.center
        squares = torch.ones_like(center[:1])
        for op in pre:
            center = op.forward(center)
            if isinstance(op, Elementwise):
                squares = squares * torch.as_tensor(op.scale, dtype=center.dtype,
                                                    device=center.device) ** 2
            else:
                squares = op.forward(squares)
        if isinstance(layer, Dense):
            row_sq = F.linear(squares, layer.weight ** 2)
        else:
            row_sq = layer._conv(squares.expand(1, *squares.shape[1:]), layer.module.weight ** 2,
                                 None)
        center = layer.forward(center)
        eps = ball._eps().reshape(-1, *([1] * (row_sq.dim() - 1)))
        radius = eps * row_sq.clamp(min=0).sqrt()
        return center - radius, center + radius

    def exact_by_ibp(self, i: int, ball: Ball) -> bool:
        """Node i's interval is already exact: one affine layer over an l_inf box (IBP is
        exact for a single affine map of a box), or over an l2 ball (`_l2_first_layer`)."""
        return self.layers.get(i, 2) <= 1 if ball.norm == "inf" else i in self.affine

    # -- the backward pass -----------------------------------------------------------
    def backward(
        self,
        target: int,
        spec: torch.Tensor,
        ball: Ball,
        bounds: dict[int, Bounds],
        alphas: dict[int, torch.Tensor] | None = None,
        extra: dict[int, torch.Tensor] | None = None,
        record: dict[int, torch.Tensor | None] | None = None,
        relaxations: dict[int, dict] | None = None,
    ) -> torch.Tensor:
        """Lower bound (batch, rows) of sum(spec[b, r] * node_target(x)) over the ball,
        with every activation before ``target`` relaxed using the bounds of its input and
        ``alphas[node]`` (batch, rows, *shape) as its free slopes where given.

        ``extra[node]`` (batch, rows, *shape) is added to the coefficients of that node's
        value: the bound is then one of spec . f(x) + sum(extra[node] * node(x))
        (beta-CROWN's split multipliers). ``record`` names nodes whose coefficients (as
        dense tensors) are written into it: BaBSR reads them at the activations, the
        branch-and-bound's primal point at the input (node 0). ``relaxations``: a dict
        the caller keeps over passes with the same ``bounds`` (only alphas and extras
        changing, as in beta-CROWN's Adam steps); each activation keeps in it what of its
        relaxation depends on the bounds alone, computed in the first pass."""
        return self._walk({target: spec}, 0.0, ball, bounds, alphas, extra, record,
                          relaxations)

    def _walk(self, coefficients, constant, ball, bounds, alphas, extra=None,
              record=None, relaxations=None, windows=None) -> torch.Tensor:
        """`backward` from the coefficients of any nodes; ``windows``, if a dict, gets the
        coefficients that reach each activation as `Patches` (`window_placements`)."""
        nodes = self.net.nodes
        for i in range(max(coefficients), -1, -1):
            a = coefficients.pop(i, None)
            if extra is not None and i in extra:
                a = extra[i] if a is None else _add(a, extra[i])
            if a is None:
                continue
            if record is not None and i in record:
                record[i] = a.to_dense() if isinstance(a, Patches) else a
            values = a.values if isinstance(a, Patches) else a
            self._widest_row = max(self._widest_row, values[0, 0].numel())
            if i == 0:
                constant = constant + ball.concretize(a)
                continue
            node = nodes[i]
            if isinstance(a, Patches) and not node.op.accepts_patches:
                a = a.to_dense()
            if node.op.linear:
                inputs, const = node.op.backward(a)
            else:
                if windows is not None and isinstance(a, Patches):
                    windows[i] = a
                lower, upper = bounds[node.inputs[0]]
                alpha = alphas.get(i) if alphas else None
                cache = None if relaxations is None else relaxations.setdefault(i, {})
                a_in, const = node.op.relaxed_backward(a, lower, upper, alpha, cache)
                inputs = [a_in]
            constant = constant + const
            for j, a_j in zip(node.inputs, inputs, strict=True):
                coefficients[j] = _add(coefficients[j], a_j) if j in coefficients else a_j
        return constant

    def _backward_rows(self, target, index, ball, bounds, alphas=None, windows=None
                       ) -> torch.Tensor:
        """Lower bounds (batch, 2R) of node_target at the neurons ``index`` (batch, R):
        the first R columns bound +z, the last R bound -z (negated upper bounds)."""
        node = self.net.nodes[target]
        dtype = ball.center.dtype
        inputs, const = node.op.backward_rows(index, node.shape, dtype)
        const = torch.as_tensor(const, dtype=dtype, device=index.device)
        const = torch.cat([const, -const], 1) if const.dim() else const
        coefficients = {}
        for j, a_j in zip(node.inputs, inputs, strict=True):
            a_j = _both_signs(a_j)
            coefficients[j] = _add(coefficients[j], a_j) if j in coefficients else a_j
        return self._walk(coefficients, const, ball, bounds, alphas, windows=windows)

    def window_placements(self, target: int, ball: Ball, bounds: dict[int, Bounds]
                          ) -> dict[int, Patches]:
        """Where the backward pass of node ``target``'s neurons meets an activation with
        windows (`Patches`), their placement for every neuron of ``target``, as one
        sample's Patches (1, n, ...) over the flat neurons (values without meaning). The
        placement of a neuron's window depends on the neuron alone, not on the sample,
        the bounds or the slopes: one walk over one sample serves every pass (alpha-CROWN
        keeps its slopes there per window, `AlphaOptimiser`), so they are found once per
        target (device and dtype) and kept: alpha-CROWN's sample chunks, bab's nodes and
        later calls reuse them."""
        key = (target, ball.center.device, ball.center.dtype)
        if key in self._placements:
            return self._placements[key]
        n = math.prod(self.net.nodes[target].shape)
        one = ball.subset(torch.zeros(1, dtype=torch.long, device=ball.center.device))
        first = {i: (lo[:1], hi[:1]) for i, (lo, hi) in bounds.items()}
        step = max(1, self._rows_per_chunk(target, 1, ball.center.element_size()) // 2)
        chunks: list[dict[int, Patches]] = []
        with torch.no_grad():
            for start in range(0, n, step):
                rows = torch.arange(start, min(start + step, n), device=ball.center.device)
                chunks.append({})
                self._backward_rows(target, rows[None], one, first, windows=chunks[-1])
        placements = {}
        for i, window in chunks[0].items():
            if any(i not in chunk or chunk[i].window != window.window for chunk in chunks):
                continue  # windows that depend on the chunk (`Patches.join`): whole-map slopes
            rows = [chunk[i] for chunk in chunks]
            half = [len(r.top[0]) // 2 for r in rows]  # the lower-bound rows of `_both_signs`
            top = torch.cat([r.top[:, :h] for r, h in zip(rows, half, strict=True)], 1)
            left = torch.cat([r.left[:, :h] for r, h in zip(rows, half, strict=True)], 1)
            values = window.values.new_zeros(()).expand(1, n, *window.values.shape[2:])
            placements[i] = Patches(values, top, left, window.shape)
        self._placements[key] = placements
        return placements

    def _rows_per_chunk(self, target: int, batch: int, itemsize: int) -> int:
        widest = max(math.prod(node.shape) for node in self.net.nodes[: target + 1])
        # a few coefficient tensors of the widest node are alive at once
        return max(1, self.memory_budget_bytes // (4 * batch * widest * itemsize))

    def neuron_bounds(self, target, index, ball, bounds, alphas=None) -> Bounds:
        """CROWN bounds (batch, R) of node ``target`` at the flat neuron indices ``index``
        (batch, R), in memory-bounded chunks of rows. ``alphas[node]`` has shape
        (batch, 2, R, *shape): slopes for the lower-bound and the upper-bound rows."""
        x = ball.center
        # the first chunk is sized for dense coefficients of the widest node; its widest
        # row as walked (patches are much narrower) sizes the rest
        step = max(1, self._rows_per_chunk(target, len(x), x.element_size()) // 2)
        lowers, uppers = [], []
        start = 0
        while start < index.shape[1]:
            if time.perf_counter() > self.deadline:
                raise DeadlineExceeded
            rows = index[:, start : start + step]
            chunk = None if alphas is None else {
                j: alpha[:, :, start : start + step].flatten(1, 2) for j, alpha in alphas.items()
            }
            self._widest_row = 1
            lb = self._backward_rows(target, rows, ball, bounds, chunk)
            lowers.append(lb[:, : rows.shape[1]])
            uppers.append(-lb[:, rows.shape[1]:])
            start += rows.shape[1]
            fit = self.memory_budget_bytes // (4 * len(x) * self._widest_row * x.element_size())
            step = max(1, fit // 2)
        if not lowers:
            empty = x.new_zeros(len(x), 0)
            return empty, empty
        return torch.cat(lowers, 1), torch.cat(uppers, 1)

    def node_bounds(self, target: int, ball: Ball, bounds: dict[int, Bounds]) -> Bounds:
        """CROWN bounds of every neuron of node ``target``, shaped like the node."""
        n = math.prod(self.net.nodes[target].shape)
        index = torch.arange(n, device=ball.center.device).expand(len(ball.center), n)
        lower, upper = self.neuron_bounds(target, index, ball, bounds)
        shape = (len(ball.center), *self.net.nodes[target].shape)
        return lower.reshape(shape), upper.reshape(shape)

    def intermediate_bounds(self, ball: Ball, method: str) -> dict[int, Bounds]:
        """Bounds of every activation's input: by IBP ("ibp") or by CROWN ("crown").

        For CROWN, in topological order, each activation input's interval comes from
        IBP over the CROWN bounds of the nodes before it (and, for inputs of at most
        FORWARD_MAX_INPUTS coordinates, from `forward_bounds` too), and only the neurons whose
        relaxation that interval leaves inexact get a backward pass, each sample its
        own (auto_LiRPA's sparse intermediate bounds do the same): a ReLU whose input
        is proven non-negative or non-positive is relaxed exactly, whatever tighter
        bound CROWN would give. CROWN's bound is intersected with the interval (both
        are sound)."""
        if method == "ibp":
            ibp = self.ibp(ball)
            return {i: ibp[i] for i in self.relu_inputs}
        bounds: dict[int, Bounds] = {}

        small = ball.center[0].numel() <= FORWARD_MAX_INPUTS
        forward = self.forward_bounds(ball) if small else None

        def crown(i: int, interval: Bounds) -> Bounds:
            if forward is not None:
                interval = (torch.maximum(interval[0], forward[i][0]),
                            torch.minimum(interval[1], forward[i][1]))
            if self.exact_by_ibp(i, ball):
                bounds[i] = interval
            else:
                rows = unstable_rows(self.activation_of[i].inexact(*interval))
                bounds[i], _ = self.refine(i, rows, ball, bounds, interval)
            return bounds[i]

        self.ibp(ball, refine=crown)
        return bounds

    def forward_bounds(self, ball: Ball) -> dict[int, Bounds] | None:
        """Bounds of every activation's input by forward-mode linear bounds (Xu et al.
        2020, "Automatic Perturbation Analysis", Sec. 3.2; auto_LiRPA's forward mode),
        for l_inf boxes and ReLU networks; None where it does not apply. Each node
        carries a lower and an upper linear function of e in [-1, 1]^n, x = mid + rad
        e: (batch, n + 1, *shape), component 0 the constant. A linear operation maps
        them to W M -+ |W| R (`_forward_linear`, from its interval rule on true
        intervals), its offset on the constant only; a ReLU on [l, u] (the functions'
        range, intersected with IBP's) scales the lower function by CROWN's adaptive
        slope and the upper one by the chord u / (u - l), minus the chord's intercept.
        Its cost grows with n, not with the neurons: for few inputs (input splitting)
        it is much cheaper than CROWN's backward passes, and exact on the affine layers
        before the first ReLU."""
        if ball.norm != "inf" or any(not isinstance(self.net.nodes[a].op, Relu)
                                     for a in self.activations):
            return None
        lower, upper = ball.box()
        mid, rad = ((upper + lower) / 2).flatten(1), ((upper - lower) / 2).flatten(1)
        batch, n = mid.shape
        start = torch.cat([mid[:, None], torch.diag_embed(rad)], 1).reshape(
            batch, n + 1, *lower.shape[1:])
        values: list[Bounds] = [(start, start)]
        intervals = self.ibp(ball)
        bounds: dict[int, Bounds] = {}
        for node in self.net.nodes[1:]:
            inputs = [values[j] for j in node.inputs]
            if node.op.linear:
                lo, hi = self._forward_linear(node.op, inputs)
                values.append((lo, hi))
                continue
            (lo, hi), j = inputs[0], node.inputs[0]
            low = lo[:, 0] - lo[:, 1:].abs().sum(1)
            high = hi[:, 0] + hi[:, 1:].abs().sum(1)
            low, high = torch.maximum(low, intervals[j][0]), torch.minimum(high, intervals[j][1])
            bounds[j] = (low, high)
            unstable = (low < 0) & (high > 0)
            active = (low >= 0).to(low.dtype)
            chord = torch.where(unstable, high / (high - low).clamp(min=1e-12), active)
            slope = torch.where(unstable, (high > -low).to(low.dtype), active)
            hi = hi * chord.unsqueeze(1)
            hi = torch.cat([hi[:, :1] - (chord * low.clamp(max=0)).unsqueeze(1), hi[:, 1:]], 1)
            values.append((lo * slope.unsqueeze(1), hi))
        return bounds

    @staticmethod
    def _forward_linear(op, inputs: list[Bounds]) -> Bounds:
        """A linear operation on forward-mode functions (batch, n + 1, *shape): W M -+ |W| R
        with M, R the functions' midpoint and half-difference, from the operation's
        interval rule, which is that exactly on true intervals: on [M - R+, M + R+] and
        on [-R-, R-] (R = R+ - R-, both >= 0); the offset b stays on component 0."""
        batch, width = inputs[0][0].shape[:2]
        plus, minus = [], []
        for lo, hi in inputs:
            mid, rad = ((hi + lo) / 2).flatten(0, 1), ((hi - lo) / 2).flatten(0, 1)
            pos, neg = rad.clamp(min=0), (-rad).clamp(min=0)
            plus.append((mid - pos, mid + pos))
            minus.append((-neg, neg))
        a_lo, a_hi = op.ibp(*plus)
        b_lo, b_hi = op.ibp(*minus)
        half, offset = (b_hi - b_lo) / 2, (b_hi + b_lo) / 2
        lo, hi = a_lo + half, a_hi - half
        direction = torch.ones(width, dtype=lo.dtype, device=lo.device)
        direction[0] = 0
        direction = direction.repeat(batch).reshape(-1, *[1] * (lo.dim() - 1))
        lo, hi = lo - direction * offset, hi - direction * offset
        return (lo.reshape(batch, width, *lo.shape[1:]), hi.reshape(batch, width, *hi.shape[1:]))

    def refine(self, target, rows, ball, bounds, reference: Bounds, alphas=None):
        """CROWN bounds of node ``target`` at ``rows`` = (index, valid) intersected with
        ``reference`` (batch, *shape). Returns (bounds to use, the same detached): with
        slopes ``alphas`` that need gradients the first is straight-through, the value of
        the intersection with the gradient of the new bound."""
        index, valid = rows
        new_lower, new_upper = self.neuron_bounds(target, index, ball, bounds, alphas)
        ref_lower, ref_upper = reference
        lower = torch.maximum(ref_lower.flatten(1).gather(1, index), new_lower.detach())
        upper = torch.minimum(ref_upper.flatten(1).gather(1, index), new_upper.detach())
        tight = (_scatter_rows(ref_lower, index, valid, lower),
                 _scatter_rows(ref_upper, index, valid, upper))
        if not new_lower.requires_grad:
            return tight, tight
        used = (_scatter_rows(ref_lower, index, valid, lower - new_lower.detach() + new_lower),
                _scatter_rows(ref_upper, index, valid, upper - new_upper.detach() + new_upper))
        return used, tight

    # -- the methods -----------------------------------------------------------------
    def lower_bound(
        self,
        spec: torch.Tensor,
        ball: Ball,
        method: str,
        alpha_iterations: int = 20,
        alpha_lr: float = 0.1,
        threshold: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Lower bound (batch, rows) of spec[b] @ f(x) over the ball, ``spec`` of shape
        (batch, rows, classes). ``method``: ibp, crown, crown-ibp or alpha-crown.
        ``threshold`` (batch,): alpha-CROWN stops optimising a sample once every row's
        bound exceeds it (early stop, as auto_LiRPA's stop criterion)."""
        out = self.net.output
        if method == "ibp":
            return self._ibp_margins(spec, ball)
        if method == "crown-ibp":
            return self.backward(out, spec, ball, self.intermediate_bounds(ball, "ibp"))
        if method not in ("crown", "alpha-crown"):
            raise ValueError(f"unknown method {method!r}")
        bounds = self.intermediate_bounds(ball, "crown")
        crown = self.backward(out, spec, ball, bounds)
        if method == "crown" or alpha_iterations <= 0:
            return crown
        best = crown.clone()
        for samples in self._alpha_chunks(bounds, spec.shape[1], ball):
            part = {i: (lo[samples], hi[samples]) for i, (lo, hi) in bounds.items()}
            optimiser = AlphaOptimiser(self, spec[samples], ball.subset(samples), part, alpha_lr)
            best[samples] = optimiser.run(
                crown[samples], alpha_iterations, None if threshold is None else threshold[samples]
            )
        return best

    def _alpha_chunks(self, bounds: dict[int, Bounds], spec_rows: int, ball: Ball):
        """Sample index chunks for alpha-CROWN whose autograd graph fits the memory budget
        x 16 (slopes are per sample and the loss is a sum over samples, so optimising
        chunks apart is the same optimisation). Per sample, a pass keeps about three
        tensors of (rows of each bounded node) x (width of every node before it)."""
        widths = [math.prod(node.shape) for node in self.net.nodes]
        rows = {i: 2 * int(self.activation_of[i].inexact(*b).flatten(1).sum(1).max())
                for i, b in bounds.items()}
        rows[self.net.output] = spec_rows
        elements = sum(r * sum(widths[: t + 1]) for t, r in rows.items())
        per_sample = 3 * elements * ball.center.element_size()
        size = max(1, 16 * self.memory_budget_bytes // max(per_sample, 1))
        n = len(ball.center)
        return [torch.arange(s, min(s + size, n), device=ball.center.device)
                for s in range(0, n, size)]

    def _ibp_margins(self, spec: torch.Tensor, ball: Ball) -> torch.Tensor:
        """IBP bounds of spec . f, with the spec merged into a final dense layer
        (C W h + C b bounded from the interval of h, as CROWN-IBP and auto_LiRPA do),
        which is never looser than bounding f first."""
        out = self.net.nodes[self.net.output]
        bounds = self.ibp(ball)
        if isinstance(out.op, Dense):
            weight = spec @ out.op.weight  # (batch, rows, hidden)
            const = spec @ out.op.bias if out.op.bias is not None else 0.0
            lower, upper = bounds[out.inputs[0]]
        else:
            weight, const = spec, 0.0
            lower, upper = bounds[self.net.output]
        mid, rad = ((upper + lower) / 2).unsqueeze(-1), ((upper - lower) / 2).unsqueeze(-1)
        return (weight @ mid - weight.abs() @ rad).squeeze(-1) + const


class AlphaOptimiser:
    """alpha-CROWN (Xu et al. 2021, Sec. 3.1, Eq. 7): for every bounded node t (each
    activation's input and the output) and every activation a before it, a slope tensor
    alpha[t][a] of shape (batch, rows of t, *shape of a). The rows of an intermediate
    node are its unstable neurons under CROWN's bounds, as lower and upper rows; where
    a row's coefficients reach an activation as a window, its slopes there are kept on
    the window (batch, rows, C, kh, kw), the only ones it reads. Adam on
    -sum(output bounds) with exponential learning-rate decay (0.98 per step, auto_LiRPA's
    default), slopes projected onto [0, 1]; every step's intermediate bounds are
    intersected with the best so far, and the best output bound is kept per row. A
    sample leaves the batch once certified (``threshold``), after ``PATIENCE`` steps
    without a gain (auto_LiRPA's early stop, per sample). Slopes are per sample, so the
    others' optimisation is unchanged. (Dropping samples whose gains look too slow to
    reach the threshold was tried and lost 2 of 27 certificates on ERAN 6x100.)"""

    DECAY = 0.98
    PATIENCE = 10

    def __init__(self, prop: BoundPropagator, spec, ball: Ball, crown: dict[int, Bounds],
                 lr: float):
        self.prop, self.spec, self.ball, self.lr = prop, spec, ball, lr
        self.reference = {i: (lo.detach(), hi.detach()) for i, (lo, hi) in crown.items()}
        nodes = prop.net.nodes
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.alphas: dict[int, dict[int, torch.Tensor]] = {}
        for target in [*prop.relu_inputs, prop.net.output]:
            windows = {}
            if target != prop.net.output:
                if prop.exact_by_ibp(target, ball):
                    continue
                inexact = prop.activation_of[target].inexact(*self.reference[target])
                self.rows[target] = unstable_rows(inexact)
                lead = (2, self.rows[target][0].shape[1])
                if lead[1]:
                    windows = prop.window_placements(target, ball, self.reference)
            else:  # the specification's rows are dense: no windows
                lead = (spec.shape[1],)
            slopes = {}
            for a in prop.activations:
                if a >= target:
                    break
                start = nodes[a].op.initial_alpha(*self.reference[nodes[a].inputs[0]])
                if start is None:
                    continue
                if a in windows:  # the slopes a row's window reaches, not the whole map
                    start = windows[a].select(self.rows[target][0]).gather(start).unsqueeze(1)
                else:
                    start = start.reshape(start.shape[0], *[1] * len(lead), *start.shape[1:])
                start = start.expand(start.shape[0], *lead, *start.shape[len(lead) + 1:])
                slopes[a] = start.detach().clone().requires_grad_(True)
            self.alphas[target] = slopes

    def _bounds(self, samples: torch.Tensor) -> torch.Tensor:
        """One pass of alpha-CROWN with the current slopes on the ``samples`` (indices)
        only, so certified and stalled samples cost nothing; tightens the reference."""
        prop = self.prop
        ball = self.ball.subset(samples)
        bounds: dict[int, Bounds] = {}
        for i in prop.relu_inputs:
            reference = tuple(t[samples] for t in self.reference[i])
            if i not in self.rows:
                bounds[i] = reference
                continue
            index, valid = (t[samples] for t in self.rows[i])
            width = int(valid.sum(1).max())
            rows = index[:, :width], valid[:, :width]
            slopes = {a: p[samples, :, :width] for a, p in self.alphas[i].items()}
            bounds[i], tight = prop.refine(i, rows, ball, bounds, reference, slopes)
            for full, part in zip(self.reference[i], tight, strict=True):
                full[samples] = part
        out = prop.net.output
        slopes = {a: p[samples] for a, p in self.alphas[out].items()}
        return prop.backward(out, self.spec[samples], ball, bounds, slopes)

    def run(self, best: torch.Tensor, iterations: int,
            threshold: torch.Tensor | None = None, deadline: float = math.inf) -> torch.Tensor:
        """Up to ``iterations`` Adam steps; none starts after ``deadline``
        (`time.perf_counter`); ``best`` is the best bound seen either way."""
        params = [p for slopes in self.alphas.values() for p in slopes.values()]
        best = best.detach().clone()
        if not params:
            return best
        optimiser = torch.optim.Adam(params, lr=self.lr, fused=True)  # one kernel a step
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, self.DECAY)
        stale = torch.zeros(len(best), dtype=torch.long, device=best.device)
        for _ in range(iterations):
            if time.perf_counter() > deadline:
                break
            open_ = stale < self.PATIENCE
            if threshold is not None:
                open_ &= (best <= threshold[:, None]).any(1)
            samples = open_.nonzero().flatten()
            if not len(samples):
                break
            with torch.enable_grad():
                lb = self._bounds(samples)
                grads = torch.autograd.grad(-lb.sum(), params, allow_unused=True)
            old = best[samples]
            gain = (lb.detach() - old > 1e-4 * (1 + old.abs())).any(1)
            stale[samples] = torch.where(gain, 0, stale[samples] + 1)
            best[samples] = torch.maximum(old, lb.detach())
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                for param in params:
                    param.clamp_(0.0, 1.0)
        else:
            everything = torch.arange(len(best), device=best.device)
            with torch.no_grad():
                best = torch.maximum(best, self._bounds(everything))
        return best
