"""A network traced with `torch.fx` into a list of bound-propagation nodes.

Each node holds an `Operation` (operators.py) and the indices of its inputs; node 0 is
the network input and the list is in topological order. Supported: Linear, Conv2d, ReLU,
Flatten / view / reshape, AvgPool2d, AdaptiveAvgPool2d, BatchNorm (eval), residual
additions and differences, and arithmetic with constants (the normalisation layer).
Anything else raises UnsupportedLayerError naming the layer: no bound is guessed.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from certbench.verifiers.base import UnsupportedLayerError
from certbench.verifiers.bound_propagation.operators import (
    AvgPool,
    Conv,
    Dense,
    Elementwise,
    Operation,
    Relu,
    Reshape,
    Sum,
)

_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout)
_RESHAPE_METHODS = {"view", "reshape", "flatten"}


class BatchNormEval(Elementwise):
    """BatchNorm with its running statistics, read from the module at every use so that
    certified training sees the current parameters."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, channels_shape: tuple):
        if module.running_var is None:
            raise UnsupportedLayerError("BatchNorm without running statistics")
        self.module, self.view = module, channels_shape

    @property
    def scale(self):
        m = self.module
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        return scale.view(self.view)

    @property
    def shift(self):
        m = self.module
        shift = -m.running_mean * torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            shift = shift * m.weight
        if m.bias is not None:
            shift = shift + m.bias
        return shift.view(self.view)


@dataclass
class Node:
    name: str
    op: Operation | None  # None for the network input
    inputs: tuple[int, ...]
    shape: tuple[int, ...]  # without the batch dimension


class TracedNetwork:
    """The nodes of ``model`` for inputs of ``input_shape`` (no batch dimension)."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]):
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types for untraceable code
            raise UnsupportedLayerError(f"cannot trace the model with torch.fx: {exc}") from exc
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        dtype = param.dtype if param is not None else None
        was_training = model.training
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *input_shape, device=device, dtype=dtype))
        model.train(was_training)
        self.graph_module = gm
        self.nodes: list[Node] = []
        index: dict[fx.Node, int] = {}  # fx node -> our node (input-dependent nodes)
        constants: dict[fx.Node, torch.Tensor] = {}
        self.output = None
        for fx_node in gm.graph.nodes:
            if fx_node.op == "placeholder":
                index[fx_node] = self._add(fx_node.name, None, (), tuple(input_shape))
            elif fx_node.op == "get_attr":
                constants[fx_node] = self._attribute(fx_node.target)
            elif fx_node.op == "output":
                result = fx_node.args[0]
                if not isinstance(result, fx.Node) or result not in index:
                    raise UnsupportedLayerError("the output is not one tensor of the input")
                self.output = index[result]
            else:
                self._convert(fx_node, index, constants)

    def _add(self, name: str, op: Operation | None, inputs: tuple, shape: tuple) -> int:
        self.nodes.append(Node(name, op, inputs, shape))
        return len(self.nodes) - 1

    def _attribute(self, target: str) -> torch.Tensor:
        value = self.graph_module
        for part in target.split("."):
            value = getattr(value, part)
        return value

    @staticmethod
    def _shape(fx_node: fx.Node) -> tuple[int, ...]:
        return tuple(fx_node.meta["tensor_meta"].shape[1:])

    def _describe(self, fx_node: fx.Node) -> str:
        if fx_node.op == "call_module":
            module = self.graph_module.get_submodule(fx_node.target)
            return f"layer {fx_node.target!r} ({type(module).__name__})"
        return f"operation {getattr(fx_node.target, '__name__', fx_node.target)!r}"

    def _convert(self, fx_node, index, constants) -> None:
        meta = fx_node.meta.get("tensor_meta")
        if not hasattr(meta, "shape"):  # e.g. an LSTM's (output, state) tuple
            raise UnsupportedLayerError(
                f"unsupported {self._describe(fx_node)}: its output is not one tensor"
            )
        shape = self._shape(fx_node)
        args = fx_node.args
        deps = [a for a in args if isinstance(a, fx.Node) and a in index]
        if not deps:  # arithmetic on constants only
            if fx_node.op == "call_function" and fx_node.target in (
                operator.add, operator.sub, operator.mul, operator.truediv, operator.neg
            ):
                constants[fx_node] = fx_node.target(*[constants.get(a, a) for a in args])
                return
            raise UnsupportedLayerError(f"operation {fx_node.target!r} does not use the input")
        source = index[deps[0]]
        in_shape = self.nodes[source].shape

        def add(op: Operation, inputs=(source,)) -> None:
            index[fx_node] = self._add(fx_node.name, op, tuple(inputs), shape)

        if fx_node.op == "call_module":
            module = self.graph_module.get_submodule(fx_node.target)
            if isinstance(module, _PASS_THROUGH_MODULES):
                index[fx_node] = source
            elif isinstance(module, nn.Linear):
                add(Dense(module))
            elif isinstance(module, nn.Conv2d):
                add(Conv(module, in_shape))
            elif isinstance(module, nn.ReLU):
                add(Relu())
            elif isinstance(module, nn.Flatten):
                add(Reshape(in_shape, shape))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                view = (-1,) + (1,) * (len(in_shape) - 1)
                add(BatchNormEval(module, view))
            elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                add(AvgPool(module, in_shape))
            else:
                raise UnsupportedLayerError(f"unsupported {self._describe(fx_node)}")
            return
        target = fx_node.target
        if fx_node.op == "call_method" and target in _RESHAPE_METHODS:
            add(Reshape(in_shape, shape))
        elif fx_node.op == "call_method" and target == "contiguous":
            index[fx_node] = source
        elif target in (torch.flatten, torch.reshape):
            add(Reshape(in_shape, shape))
        elif target in (torch.relu, nn.functional.relu) or (
            fx_node.op == "call_method" and target == "relu"
        ):
            add(Relu())
        elif target in (operator.add, operator.sub, torch.add, torch.sub) and not fx_node.kwargs:
            sign = -1.0 if target in (operator.sub, torch.sub) else 1.0
            if len(deps) == 2:
                add(Sum((1.0, sign)), (index[args[0]], index[args[1]]))
            else:
                const = constants.get(args[1], args[1]) if args[0] in index else constants.get(
                    args[0], args[0])
                if args[0] in index:
                    add(Elementwise(1.0, sign * const))
                else:  # const - x or const + x
                    add(Elementwise(sign, const))
        elif target in (operator.mul, torch.mul) and len(deps) == 1 and not fx_node.kwargs:
            other = args[1] if args[0] in index else args[0]
            add(Elementwise(constants.get(other, other), 0.0))
        elif target in (operator.truediv, torch.div) and args[0] in index and len(deps) == 1:
            if fx_node.kwargs:
                raise UnsupportedLayerError(f"division with {fx_node.kwargs}")
            add(Elementwise(1.0 / constants.get(args[1], args[1]), 0.0))
        else:
            raise UnsupportedLayerError(f"unsupported {self._describe(fx_node)} at {fx_node.name}")
