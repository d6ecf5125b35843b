"""Interval and linear bound propagation over a traced network.

- IBP (Gowal et al. 2018): intervals pushed forward node by node.
- CROWN (Zhang et al. 2018, Sec. 3): a linear lower bound of spec . f(x) built backward
  from the output, each ReLU replaced by its linear relaxation given the bounds of its
  input; those intermediate bounds come from CROWN itself, node by node in topological
  order, so each backward pass only meets ReLUs that are already bounded.
- CROWN-IBP (Zhang et al. 2020, Sec. 3.2): intermediate bounds from IBP, the final bound
  by the CROWN backward pass.
- alpha-CROWN (Xu et al. 2021, Sec. 3.1): the lower slopes of unstable ReLUs in the final
  backward pass are free parameters in [0, 1], optimised by projected gradient ascent on
  the bound. Every slope in [0, 1] gives a sound bound, the best bound seen per sample
  and spec row is kept, and the start is CROWN's slopes, so it is never looser than
  CROWN. Intermediate bounds are CROWN's (auto_LiRPA also optimises those).

The input set is an l_inf or l2 ball around x0 intersected with the [0, 1] box.
"""

from __future__ import annotations

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
    relu_backward,
    relu_relaxation,
)

Bounds = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Ball:
    """{x : ||x - center||_p <= eps} intersected with [0, 1]^d (if ``clip``).

    ``eps`` is a float or a (batch,) tensor (one radius per sample, for bisection)."""

    center: torch.Tensor
    eps: float | torch.Tensor
    norm: str
    clip: bool = True

    def _eps(self) -> torch.Tensor:
        eps = torch.as_tensor(self.eps, dtype=self.center.dtype, device=self.center.device)
        return eps.reshape(-1, *([1] * (self.center.dim() - 1)))

    def box(self) -> Bounds:
        """An axis-aligned box containing the set (exactly the set for l_inf)."""
        eps = self._eps()
        lower, upper = self.center - eps, self.center + eps
        if self.clip:
            lower, upper = lower.clamp(min=0.0), upper.clamp(max=1.0)
        return lower, upper

    def concretize(self, a: torch.Tensor) -> torch.Tensor:
        """min over the set of sum(a[b, r] * x), for a of shape (batch, rows, *input)."""
        flat = a.flatten(2)
        lower, upper = self.box()
        mid = ((upper + lower) / 2).flatten(1).unsqueeze(-1)
        rad = ((upper - lower) / 2).flatten(1).unsqueeze(-1)
        over_box = (flat @ mid - flat.abs() @ rad).squeeze(-1)
        if self.norm == "inf":
            return over_box
        eps = self._eps().reshape(-1, 1)
        center = self.center.flatten(1).unsqueeze(-1)
        over_ball = (flat @ center).squeeze(-1) - eps * flat.norm(dim=2)
        # the set lies in both the ball and the box, so both minima are lower bounds
        return torch.maximum(over_ball, over_box) if self.clip else over_ball


class BoundPropagator:
    """IBP, CROWN, CROWN-IBP and alpha-CROWN lower bounds on spec . f(x) over a Ball.

    ``memory_budget_bytes`` caps the coefficient tensors of one backward pass: the rows of
    an intermediate layer's identity specification are processed in chunks that fit.
    """

    def __init__(self, network: TracedNetwork, memory_budget_bytes: int = 64 << 20):
        self.net = network
        self.memory_budget_bytes = memory_budget_bytes
        self.relu_inputs = [
            node.inputs[0] for node in network.nodes if isinstance(node.op, Relu)
        ]
        self.affine: set[int] = set()  # nodes that are affine functions of the input
        for i, node in enumerate(network.nodes):
            if i == 0 or (not isinstance(node.op, Relu)
                          and all(j in self.affine for j in node.inputs)):
                self.affine.add(i)

    # -- forward and intervals -------------------------------------------------------
    def ibp(self, ball: Ball) -> list[Bounds]:
        """Interval bounds of every node. For an l2 ball the inputs of the first ReLUs,
        affine in the input, are bounded exactly (w.x0 -+ eps ||w||, the backward pass
        without relaxations) rather than through the ball's bounding box, as auto_LiRPA
        does; the two intervals are intersected."""
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

    # -- the backward pass -----------------------------------------------------------
    def backward(
        self,
        target: int,
        spec: torch.Tensor,
        ball: Ball,
        bounds: dict[int, Bounds],
        alphas: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Lower bound (batch, rows) of sum(spec[b, r] * node_target(x)) over the ball,
        with every ReLU before ``target`` relaxed using the bounds of its input."""
        nodes = self.net.nodes
        coefficients: dict[int, torch.Tensor] = {target: spec}
        constant: torch.Tensor | float = 0.0
        for i in range(target, -1, -1):
            a = coefficients.pop(i, None)
            if a is None:
                continue
            if i == 0:
                constant = constant + ball.concretize(a)
                continue
            node = nodes[i]
            if isinstance(node.op, Relu):
                lower, upper = bounds[node.inputs[0]]
                alpha = alphas.get(i) if alphas else None
                a_in, const = relu_backward(a, lower, upper, alpha)
                inputs = [a_in]
            else:
                inputs, const = node.op.backward(a)
            constant = constant + const
            for j, a_j in zip(node.inputs, inputs, strict=True):
                coefficients[j] = coefficients[j] + a_j if j in coefficients else a_j
        return constant

    def _rows_per_chunk(self, target: int, batch: int, itemsize: int) -> int:
        widest = max(
            int(torch.tensor(node.shape).prod()) for node in self.net.nodes[: target + 1]
        )
        # a few coefficient tensors of the widest node are alive at once
        return max(1, self.memory_budget_bytes // (4 * batch * widest * itemsize))

    def node_bounds(
        self, target: int, ball: Ball, bounds: dict[int, Bounds],
        neurons: torch.Tensor | None = None,
    ) -> Bounds:
        """CROWN bounds of the neurons of node ``target`` (lower bounds from identity rows,
        upper bounds from negated rows), in memory-bounded chunks. ``neurons`` (flat
        indices) restricts the work to those; the result then holds only their bounds,
        shape (batch, len(neurons))."""
        shape = self.net.nodes[target].shape
        x = ball.center
        n = int(torch.tensor(shape).prod())
        if neurons is None:
            neurons = torch.arange(n, device=x.device)
        step = max(1, self._rows_per_chunk(target, len(x), x.element_size()) // 2)
        lowers, uppers = [], []
        for start in range(0, len(neurons), step):
            rows = neurons[start : start + step]
            eye = torch.zeros(len(rows), n, dtype=x.dtype, device=x.device)
            eye[torch.arange(len(rows)), rows] = 1.0
            spec = torch.cat([eye, -eye]).reshape(1, 2 * len(rows), *shape)
            spec = spec.expand(len(x), *spec.shape[1:])
            lb = self.backward(target, spec, ball, bounds)
            lowers.append(lb[:, : len(rows)])
            uppers.append(-lb[:, len(rows):])
        if not lowers:
            empty = x.new_zeros(len(x), 0)
            return empty, empty
        lower, upper = torch.cat(lowers, 1), torch.cat(uppers, 1)
        if len(neurons) == n:
            return lower.reshape(len(x), *shape), upper.reshape(len(x), *shape)
        return lower, upper

    def intermediate_bounds(self, ball: Ball, method: str) -> dict[int, Bounds]:
        """Bounds of every ReLU input: by IBP ("ibp") or by CROWN ("crown").

        For CROWN, only neurons that IBP finds unstable for some sample of the batch get
        a backward pass: a ReLU whose input IBP proves non-negative or non-positive is
        relaxed exactly whatever tighter bound CROWN would give, so IBP's bound serves."""
        ibp = self.ibp(ball)
        if method == "ibp":
            return {i: ibp[i] for i in self.relu_inputs}
        bounds: dict[int, Bounds] = {}
        for i in self.relu_inputs:
            if ball.norm != "inf" and i in self.affine:
                bounds[i] = ibp[i]  # already exact: ibp() ran the backward pass for it
                continue
            lower, upper = (t.flatten(1).clone() for t in ibp[i])
            unstable = ((lower < 0) & (upper > 0)).any(dim=0).nonzero().flatten()
            crown_lower, crown_upper = self.node_bounds(i, ball, bounds, unstable)
            lower[:, unstable] = crown_lower.reshape(len(lower), -1)
            upper[:, unstable] = crown_upper.reshape(len(lower), -1)
            shape = (len(lower), *self.net.nodes[i].shape)
            bounds[i] = (lower.reshape(shape), upper.reshape(shape))
        return bounds

    # -- the methods -----------------------------------------------------------------
    def lower_bound(
        self,
        spec: torch.Tensor,
        ball: Ball,
        method: str,
        alpha_iterations: int = 20,
        alpha_lr: float = 0.1,
    ) -> torch.Tensor:
        """Lower bound (batch, rows) of spec[b] @ f(x) over the ball, ``spec`` of shape
        (batch, rows, classes). ``method``: ibp, crown, crown-ibp or alpha-crown."""
        out = self.net.output
        if method == "ibp":
            return self._ibp_margins(spec, ball)
        if method == "crown-ibp":
            return self.backward(out, spec, ball, self.intermediate_bounds(ball, "ibp"))
        if method not in ("crown", "alpha-crown"):
            raise ValueError(f"unknown method {method!r}")
        bounds = self.intermediate_bounds(ball, "crown")
        crown = self.backward(out, spec, ball, bounds)
        if method == "crown":
            return crown
        return self._optimise_alphas(spec, ball, bounds, crown, alpha_iterations, alpha_lr)

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

    def _optimise_alphas(self, spec, ball, bounds, best, iterations, lr) -> torch.Tensor:
        alphas = {}
        for i, node in enumerate(self.net.nodes):
            if isinstance(node.op, Relu):
                lower, upper = bounds[node.inputs[0]]
                slope, _, _ = relu_relaxation(lower, upper)
                alphas[i] = slope.unsqueeze(1).expand(-1, spec.shape[1], *slope.shape[1:])
                alphas[i] = alphas[i].detach().clone().requires_grad_(True)
        if not alphas:
            return best
        best = best.detach()
        optimiser = torch.optim.Adam(list(alphas.values()), lr=lr)
        for step in range(iterations + 1):
            with torch.enable_grad():
                lb = self.backward(self.net.output, spec, ball, bounds, alphas)
                best = torch.maximum(best, lb.detach())
                if step == iterations:
                    break
                grads = torch.autograd.grad(-lb.sum(), list(alphas.values()))
            for alpha, grad in zip(alphas.values(), grads, strict=True):
                alpha.grad = grad
            optimiser.step()
            with torch.no_grad():
                for alpha in alphas.values():
                    alpha.clamp_(0.0, 1.0)
        return best
