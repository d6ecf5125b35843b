"""Global-Lipschitz certification: GloRo nets and Lipschitz-Margin Training bounds.

An l2 Lipschitz upper bound of the network is composed along the graph that the
bound-propagation engine traces (`bound_propagation.graph.TracedNetwork`, the graph that
also serves CROWN, the local-Lipschitz bound and the MILP), node by node, as the
Lipschitz constant of each node *as a function of the network input*. Each operation
states its own rule (``Operation.lipschitz`` in bound_propagation/operators.py), so
adding an operation is one class plus one conversion-table entry:

- a linear layer g applied to node h:  L(g(h)) <= ||g|| * L(h)   (operator_norms.py:
  dense, convolution on its padded input, average pooling, BatchNorm in eval mode)
- a sum or difference of nodes:        L(a +- b) <= L(a) + L(b)  (so a residual block
  x + branch(x) gets (1 + L(branch)) * L(x))
- a node times / divided by a constant c, or plus a constant:  L * max|c|  /
  L * max|1 / c|  /  L (the normalisation layer's 1/std is this rule)
- a concatenation of nodes:            L(cat(a, b)) <= sqrt(L(a)^2 + L(b)^2)
- ReLU, tanh, MinMax, flatten and reshape:  L unchanged (1-Lipschitz, isometries);
  sigmoid: L / 4 (its largest slope).

Any other operation raises UnsupportedLayerError naming it: no bound is guessed.

Certified radii for the predicted class y (ties are never certified):

- LMT (Tsuzuku, Sato and Sugiyama 2018, Prop. 2): the margin m = f_y - max_{j!=y} f_j
  satisfies |m(x) - m(x')| <= sqrt(2) L ||x - x'||, so r = m / (sqrt(2) L).
- GloRo (Leino, Wang and Fredrikson 2021, Sec. 3): with the last layer f = W h + b and
  K_yj = L(h) * ||w_y - w_j||, the pairwise margin f_y - f_j is K_yj-Lipschitz, so
  r = min_{j!=y} (f_y - f_j) / K_yj. Never smaller than the LMT radius.
- l_inf balls: ||d||_2 <= sqrt(D) ||d||_inf on D input dimensions, so the l_inf radius is
  the l2 radius / sqrt(D) ("linf_via_l2"); loose by design and named so.

Float safety: L is computed in float64 and inflated by ``REL_SLACK``; margins come from a
float32 forward pass and are reduced by ``base.float_slack`` (1e-5 * (1 + max |f|)), so
rounding of the logits cannot turn a zero margin into a certificate. This is a
conservative allowance, not a rigorous floating-point analysis of the forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from certbench.verifiers import operator_norms
from certbench.verifiers.base import (
    Certificate,
    UnsupportedLayerError,
    Verdict,
    check_certify_call,
    float_slack,
    register,
    verdict_code,
)
from certbench.verifiers.bound_propagation.graph import Node, TracedNetwork
from certbench.verifiers.bound_propagation.operators import Dense

CERTIFIED, NOT_CERTIFIED = verdict_code(Verdict.CERTIFIED), verdict_code(Verdict.NOT_CERTIFIED)
REL_SLACK = 1e-6


@dataclass
class LipschitzBounds:
    """network: bound on the whole network's l2 Lipschitz constant;
    penultimate: bound on the input of the last Linear layer;
    last_weight: that layer's weight (rows w_j)."""

    network: torch.Tensor
    penultimate: torch.Tensor | None
    last_weight: torch.Tensor | None

    def pairwise(self) -> torch.Tensor:
        """K_ij = L(penultimate) * ||w_i - w_j||_2 (GloRo), an (m, m) matrix."""
        if self.penultimate is None or self.last_weight is None:
            raise UnsupportedLayerError("the GloRo bound needs a network ending in nn.Linear")
        w = self.last_weight
        diff = w[:, None, :] - w[None, :, :]
        # sqrt(x + tiny) keeps the gradient finite on the zero diagonal
        return self.penultimate * torch.sqrt((diff * diff).sum(-1) + 1e-30)


class LipschitzGraph:
    """A traced network whose Lipschitz bound can be recomputed from its current weights.

    The engine's tracing (`TracedNetwork`, shapes included) happens once here; ``bounds``
    re-reads the parameters on each call (differentiably), so training recipes call it
    every step.

    ``power_iteration=True`` replaces the exact norms of dense and convolutional layers by
    power-iteration *estimates* with vectors kept between calls (``vectors``, one per
    node; a training resume point saves them): cheap enough to train 4C3F-sized models on
    a CPU, but the result can fall below the true constant, so it is for training only;
    the verifier never sets it. ``power_steps``: steps a call after the first (which takes 30 from a
    seeded vector); one step is spectral normalisation's update. ``power_gradient``: with
    ``"steps"`` more steps are differentiated through, as GloRo's paper snapshot trains;
    with ``"final"`` they are constants and the gradient flows through the final ||A u||
    alone, as GloRo's library trains (`operator_norms.power_iteration_estimate`).
    `converge` runs the kept vectors to convergence (the library's refresh at each epoch's
    end).
    The estimator is handed to every operation's ``lipschitz`` rule, and
    the layers whose exact norm is an SVD apply it to their linear map (see
    ``Operation.lipschitz``), so this class never asks which operation a node holds.
    """

    def __init__(
        self, model: nn.Module, input_shape: Sequence[int], power_iteration: bool = False,
        power_steps: int = 1, power_gradient: str = "steps",
    ):
        if power_steps < 1:
            raise ValueError(f"power_steps must be at least 1, got {power_steps}")
        if power_gradient not in ("steps", "final"):
            raise ValueError(f"power_gradient must be 'steps' or 'final', got {power_gradient!r}")
        self.network = TracedNetwork(model, input_shape)
        self.power_iteration = power_iteration
        self.power_steps = power_steps
        self.power_gradient = power_gradient
        self._converging = 0  # steps a call takes while `converge` runs, undifferentiated
        self.vectors: dict[int, torch.Tensor] = {}
        param = next(model.parameters(), None)
        self._device = param.device if param is not None else None
        self._dtype = param.dtype if param is not None else torch.get_default_dtype()

    def bounds(self, dtype: torch.dtype = torch.float64) -> LipschitzBounds:
        net = self.network
        lip = [torch.ones((), dtype=dtype, device=self._device)]  # node 0: the input
        for index, node in enumerate(net.nodes[1:], start=1):
            estimate = partial(self._estimate, index) if self.power_iteration else None
            try:
                lip.append(node.op.lipschitz([lip[i] for i in node.inputs], estimate))
            except UnsupportedLayerError as exc:
                raise UnsupportedLayerError(f"{exc} ({self._describe(node)})") from exc
        final = net.nodes[net.output]
        penultimate = last_weight = None
        if isinstance(final.op, Dense):  # GloRo's pairwise bound needs a dense last layer
            penultimate = lip[final.inputs[0]]
            last_weight = final.op.weight.to(dtype)
        return LipschitzBounds(lip[net.output], penultimate, last_weight)

    def _estimate(
        self, index: int, apply: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Power-iteration estimate of ||apply|| for node ``index``: 30 steps from a
        seeded random vector the first time, then ``power_steps`` from the kept vector."""
        u = self.vectors.get(index)
        if u is None:
            shape = self.network.nodes[self.network.nodes[index].inputs[0]].shape
            generator = torch.Generator().manual_seed(0)
            u = torch.randn((1, *shape), generator=generator).to(self._device, self._dtype)
            sigma, self.vectors[index] = operator_norms.power_iteration_estimate(apply, u, 30)
        elif self._converging:
            sigma, self.vectors[index] = operator_norms.power_iteration_estimate(
                apply, u, self._converging)
        else:
            sigma, self.vectors[index] = operator_norms.power_iteration_estimate(
                apply, u, self.power_steps,
                differentiate=self.power_steps > 1 and self.power_gradient == "steps",
            )
        return sigma

    def converge(self, tolerance: float = 1e-4, chunk: int = 100,
                 max_chunks: int = 50) -> float:
        """Run the kept vectors to convergence: ``chunk`` undifferentiated steps a round
        until the network's estimate moves by less than ``tolerance`` (relative) in a
        round, at most ``max_chunks`` rounds; returns the estimate. GloRo's library does
        this before training and at each epoch's end (its ``UpdatePowerIterates``): the
        one or few steps a training step takes lag the top singular vector while the
        weights move, most where the spectrum is flat (orthogonal initialisation)."""
        if not self.power_iteration:
            raise ValueError("converge applies to power_iteration=True only")
        self._converging = chunk
        try:
            previous = math.inf
            for _ in range(max_chunks):
                estimate = float(self.bounds().network.detach())
                if abs(estimate - previous) <= tolerance * estimate:
                    break
                previous = estimate
        finally:
            self._converging = 0
        return estimate

    def _describe(self, node: Node) -> str:
        """The layer behind a node, for error messages."""
        gm = self.network.graph_module
        for fx_node in gm.graph.nodes:
            if fx_node.name == node.name and fx_node.op == "call_module":
                module = gm.get_submodule(fx_node.target)
                return f"layer {fx_node.target!r} ({type(module).__name__})"
        return f"node {node.name!r}"


def margins(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction y = argmax f and the pairwise margins f_y - f_j, float64, +inf at j = y."""
    logits = logits.to(torch.float64)
    prediction = logits.argmax(dim=1)
    pairwise = logits.gather(1, prediction[:, None]) - logits
    pairwise.scatter_(1, prediction[:, None], math.inf)
    return prediction, pairwise


@register("global-lipschitz", "global l2 Lipschitz bound: GloRo (pairwise) or LMT radius")
class GlobalLipschitzVerifier:
    """Certify with a global Lipschitz bound; ``bound`` is "gloro" (default) or "lmt".

    Setup computes the bound once per model (cached on the instance); certification is one
    forward pass plus O(classes^2) arithmetic.
    """

    name = "global-lipschitz"

    def __init__(self, bound: str = "gloro"):
        if bound not in ("gloro", "lmt"):
            raise ValueError(f"bound must be 'gloro' or 'lmt', got {bound!r}")
        self.bound = bound
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model.eval()
        self.input_dim = math.prod(input_shape)
        with torch.no_grad():
            bounds = LipschitzGraph(model, input_shape).bounds(torch.float64)
        self.lipschitz = float(bounds.network) * (1 + REL_SLACK)
        self.pairwise = (
            bounds.pairwise() * (1 + REL_SLACK) if self.bound == "gloro" else None
        )

    def radius_l2(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Certified l2 radius per sample, the prediction, and the Lipschitz constant of the
        margin that limits it."""
        prediction, pairwise = margins(logits)
        slack = float_slack(logits)[:, None]
        if self.bound == "lmt":
            lip = torch.full_like(slack[:, 0], math.sqrt(2) * self.lipschitz)
            radius = (pairwise.min(dim=1).values - slack[:, 0]) / lip
        else:
            k = self.pairwise.to(logits.device)[prediction]  # (n, m): K_yj
            per_class = (pairwise - slack) / k
            radius, limiting = per_class.min(dim=1)
            lip = k.gather(1, limiting[:, None])[:, 0]
        return radius.clamp(min=0.0), prediction, lip

    @torch.no_grad()
    def certify(self, x: torch.Tensor, norm: str, eps: Sequence[float]) -> Certificate:
        check_certify_call(self.model, norm)
        logits = self.model(x)
        radius, prediction, lip = self.radius_l2(logits)
        margin = margins(logits)[1].min(dim=1).values
        if norm == "inf":
            radius = radius / math.sqrt(self.input_dim)
        certified = radius[:, None] > torch.tensor(eps, dtype=radius.dtype, device=radius.device)
        verdicts = torch.where(certified, CERTIFIED, NOT_CERTIFIED).to(torch.int8)
        return Certificate(
            prediction=prediction.cpu(),
            verdicts=verdicts.cpu(),
            radius=radius.cpu(),
            columns={"margin": margin.cpu(), "lipschitz_bound": lip.cpu()},
        )
