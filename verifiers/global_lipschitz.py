"""Global-Lipschitz certification: GloRo nets and Lipschitz-Margin Training bounds.

An l2 Lipschitz upper bound of the network is composed along its `torch.fx` graph, node
by node, as the Lipschitz constant of each node *as a function of the network input*:

- a layer g applied to node h:      L(g(h)) <= ||g|| * L(h)   (operator_norms.py)
- a sum or difference of nodes:     L(a +- b) <= L(a) + L(b)  (so a residual block
  x + branch(x) gets (1 + L(branch)) * L(x))
- a node times / divided by a constant c:  L * max|c|  /  L / min|c|  (the
  normalisation layer's 1/std is this rule)
- ReLU, flatten and reshape:        L unchanged (1-Lipschitz, isometries).

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
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

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

CERTIFIED, NOT_CERTIFIED = verdict_code(Verdict.CERTIFIED), verdict_code(Verdict.NOT_CERTIFIED)
REL_SLACK = 1e-6

_IDENTITY_FUNCTIONS = {torch.flatten, torch.relu, nn.functional.relu, torch.reshape}
_IDENTITY_METHODS = {"view", "reshape", "flatten", "contiguous", "relu"}
_IDENTITY_MODULES = (nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout)


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

    Tracing and shape propagation happen once here; ``bounds`` re-reads the parameters on
    each call (differentiably), so training recipes call it every step.

    ``power_iteration=True`` replaces the exact norms of dense and convolutional layers by
    power-iteration *estimates* with vectors kept between calls (the explicit cache
    ``_vectors``): cheap enough to train 4C3F-sized models on a CPU, but the result can
    fall below the true constant, so it is for training only; the verifier never sets it.
    """

    def __init__(
        self, model: nn.Module, input_shape: Sequence[int], power_iteration: bool = False
    ):
        self.power_iteration = power_iteration
        self._vectors: dict[str, torch.Tensor] = {}
        try:
            self.graph_module = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types for untraceable code
            raise UnsupportedLayerError(f"cannot trace the model with torch.fx: {exc}") from exc
        param = next(model.parameters(), None)
        example = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            ShapeProp(self.graph_module).propagate(example)
        model.train(was_training)

    def bounds(self, dtype: torch.dtype = torch.float64) -> LipschitzBounds:
        gm = self.graph_module
        lip: dict[fx.Node, torch.Tensor | None] = {}  # None: the node is a constant
        result = None
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                lip[node] = torch.ones((), dtype=dtype)
            elif node.op == "get_attr":
                lip[node] = None
            elif node.op == "output":
                result = node.args[0]
            elif node.op == "call_module":
                module = gm.get_submodule(node.target)
                lip[node] = self._layer_norm(module, node, dtype) * lip[node.args[0]]
            else:
                lip[node] = self._function_rule(node, lip)
        if not isinstance(result, fx.Node) or lip.get(result) is None:
            raise UnsupportedLayerError("the network output is not a single tensor of the input")
        penultimate = last_weight = None
        if result.op == "call_module":
            last = gm.get_submodule(result.target)
            if isinstance(last, nn.Linear):
                penultimate = lip[result.args[0]]
                last_weight = last.weight.to(dtype)
        return LipschitzBounds(lip[result], penultimate, last_weight)

    def _estimate(
        self, node: fx.Node, apply: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        u = self._vectors.get(node.name)
        steps = 1
        if u is None:
            meta = node.args[0].meta["tensor_meta"]
            generator = torch.Generator().manual_seed(0)
            u = torch.randn(tuple(meta.shape), generator=generator).to(meta.dtype)
            u = u.to(next(iter(self.graph_module.parameters())).device)
            steps = 30
        sigma, self._vectors[node.name] = operator_norms.power_iteration_estimate(apply, u, steps)
        return sigma

    @staticmethod
    def _input_hw(node: fx.Node) -> tuple[int, int]:
        shape = node.args[0].meta["tensor_meta"].shape
        return int(shape[-2]), int(shape[-1])

    def _layer_norm(self, module: nn.Module, node: fx.Node, dtype: torch.dtype) -> torch.Tensor:
        one = torch.ones((), dtype=dtype)
        if isinstance(module, _IDENTITY_MODULES):
            return one
        if isinstance(module, nn.Linear):
            if self.power_iteration:
                return self._estimate(node, lambda t: F.linear(t, module.weight))
            return operator_norms.dense_norm(module.weight.to(dtype))
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(
                module.padding, str
            ):
                raise UnsupportedLayerError(
                    f"Conv2d {node.target!r}: only groups=1 with numeric zero padding is supported"
                )
            if self.power_iteration:
                return self._estimate(node, lambda t: F.conv2d(
                    t, module.weight, None, module.stride, module.padding, module.dilation
                ))
            return operator_norms.conv2d_norm(
                module.weight.to(dtype),
                self._input_hw(node),
                module.padding,
                module.stride,
                module.dilation,
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return operator_norms.batchnorm_norm(module, dtype)
        if isinstance(module, nn.AvgPool2d):
            if module.padding not in (0, (0, 0)) and not module.count_include_pad:
                raise UnsupportedLayerError(
                    f"AvgPool2d {node.target!r} with count_include_pad=False"
                )
            kernel = _pair(module.kernel_size)
            stride = _pair(module.stride if module.stride is not None else kernel)
            return one * operator_norms.avg_pool2d_norm(kernel, stride)
        if isinstance(module, nn.AdaptiveAvgPool2d) and _pair(module.output_size) == (1, 1):
            return one * operator_norms.global_avg_pool_norm(self._input_hw(node))
        raise UnsupportedLayerError(
            f"no Lipschitz bound for layer {node.target!r} ({type(module).__name__})"
        )

    def _function_rule(
        self, node: fx.Node, lip: dict[fx.Node, torch.Tensor | None]
    ) -> torch.Tensor | None:
        def of(arg: object) -> torch.Tensor | None:
            return lip[arg] if isinstance(arg, fx.Node) else None

        target = node.target
        args = [of(a) for a in node.args]
        arithmetic = (operator.add, operator.sub, torch.add, operator.mul, torch.mul,
                      operator.truediv, torch.div)
        if node.kwargs and target in arithmetic:  # e.g. torch.add(x, y, alpha=2)
            raise UnsupportedLayerError(f"no Lipschitz rule for {target!r} with {node.kwargs}")
        if node.op == "call_method" and target in _IDENTITY_METHODS:
            return args[0]
        if node.op == "call_function" and target in _IDENTITY_FUNCTIONS:
            return args[0]
        if node.op == "call_function" and target in (operator.add, operator.sub, torch.add):
            dependent = [a for a in args[:2] if a is not None]
            return sum(dependent[1:], dependent[0]) if dependent else None
        if node.op == "call_function" and target in (operator.mul, torch.mul):
            if args[0] is not None and args[1] is not None:
                raise UnsupportedLayerError(f"product of two input-dependent tensors at {node}")
            var, const = (0, 1) if args[0] is not None else (1, 0)
            if args[var] is None:
                return None
            return args[var] * self._constant(node.args[const]).abs().max()
        if node.op == "call_function" and target in (operator.truediv, torch.div):
            if args[1] is not None:
                raise UnsupportedLayerError(f"division by an input-dependent tensor at {node}")
            if args[0] is None:
                return None
            return args[0] / self._constant(node.args[1]).abs().min()
        if all(a is None for a in args):
            return None  # arithmetic on constants only
        raise UnsupportedLayerError(f"no Lipschitz rule for operation {target!r} at node {node}")

    def _constant(self, arg: object) -> torch.Tensor:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = self.graph_module
            for part in arg.target.split("."):
                value = getattr(value, part)
            return value.detach().to(torch.float64)
        if isinstance(arg, (int, float)):
            return torch.tensor(float(arg), dtype=torch.float64)
        raise UnsupportedLayerError(f"cannot evaluate constant {arg!r}")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


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
