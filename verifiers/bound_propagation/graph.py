"""A network traced with `torch.fx` into a list of bound-propagation nodes.

Each node holds an `Operation` (operators.py) and the indices of its inputs; node 0 is
the network input and the list is in topological order. Modules and one-input functions
convert through the tables `MODULE_OPERATIONS` and `FUNCTION_OPERATIONS`; residual
additions and differences, concatenation and arithmetic with constants (the
normalisation layer) by the rules of `_convert`. Anything else raises
UnsupportedLayerError naming the layer: no bound is guessed.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from certbench.verifiers import layers
from certbench.verifiers.base import UnsupportedLayerError
from certbench.verifiers.bound_propagation.index_map import IndexMap, IndexMapOperation
from certbench.verifiers.bound_propagation.operators import (
    AvgPool,
    BatchNormEval,
    Concat,
    Conv,
    ConvTranspose,
    Dense,
    Elementwise,
    MaxPool,
    MinMax,
    Operation,
    Relu,
    Reshape,
    Sigmoid,
    Sum,
    Tanh,
)

# Conversion tables: adding an operation is one class in operators.py and one entry here
# (and one in ONNX_ACTIVATIONS for ONNX files).
# Modules match by exact type: a subclass may override forward, so it is refused.
MODULE_OPERATIONS: dict[type[nn.Module], type[Operation]] = {
    nn.Linear: Dense,
    nn.Conv2d: Conv,
    nn.ConvTranspose2d: ConvTranspose,
    nn.ReLU: Relu,
    nn.Sigmoid: Sigmoid,
    nn.Tanh: Tanh,
    nn.Flatten: Reshape,
    nn.Unflatten: Reshape,
    nn.BatchNorm1d: BatchNormEval,
    nn.BatchNorm2d: BatchNormEval,
    nn.AvgPool2d: AvgPool,
    nn.AdaptiveAvgPool2d: AvgPool,
    nn.MaxPool2d: MaxPool,
    layers.MinMax: MinMax,
    IndexMap: IndexMapOperation,
}
ONNX_ACTIVATIONS: dict[str, Callable[[dict], nn.Module]] = {
    "Relu": lambda attributes: nn.ReLU(),
    "Sigmoid": lambda attributes: nn.Sigmoid(),
    "Tanh": lambda attributes: nn.Tanh(),
}
"""ONNX elementwise activation (op type) -> its ``nn`` module, given the node's attributes
(name -> value). The harness's ONNX import (`certbench.io.onnx_import`) reads this table,
so an activation taught to the engine comes in from ONNX files with one entry here."""
FUNCTION_OPERATIONS: dict[object, type[Operation]] = {  # one-input functions and methods
    torch.relu: Relu, F.relu: Relu, "relu": Relu,
    torch.sigmoid: Sigmoid, F.sigmoid: Sigmoid, "sigmoid": Sigmoid,
    torch.tanh: Tanh, F.tanh: Tanh, "tanh": Tanh,
    torch.flatten: Reshape, torch.reshape: Reshape,
    "view": Reshape, "reshape": Reshape, "flatten": Reshape,
}
PASS_THROUGH = (nn.Identity, nn.Dropout)
# `buffer * x` traces as the method call buffer.mul(x): the same rule as operator.mul
METHOD_ARITHMETIC = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
                     "div": operator.truediv}


@dataclass
class Node:
    name: str
    op: Operation | None  # None for the network input
    inputs: tuple[int, ...]
    shape: tuple[int, ...]  # without the batch dimension


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping the layers of the conversion table whole (the engine's
    own, such as `IndexMap`, would otherwise be traced into)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in MODULE_OPERATIONS or super().is_leaf_module(m, module_qualified_name)


class TracedNetwork:
    """The nodes of ``model`` for inputs of ``input_shape`` (no batch dimension)."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]):
        try:
            gm = fx.GraphModule(model, _Tracer().trace(model))
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

    def decomposed(self) -> TracedNetwork:
        """This network with every operation that has a `decomposition` replaced by its
        parts (MinMax by a difference, a ReLU and a merge): the graph CROWN and
        alpha-CROWN relax. The interval rules of the parts are looser than the whole's
        (IBP keeps the whole) and the Lipschitz and gradient rules take the whole."""
        nodes: list[Node] = []
        where: dict[int, int] = {}  # node here -> node there
        for i, node in enumerate(self.nodes):
            parts = None if node.op is None else node.op.decomposition(
                self.nodes[node.inputs[0]].shape, node.shape)
            if parts is None:
                nodes.append(replace(node, inputs=tuple(where[j] for j in node.inputs)))
            else:
                first = len(nodes)
                for k, (op, inputs, shape) in enumerate(parts):
                    last = k == len(parts) - 1
                    nodes.append(Node(
                        node.name if last else f"{node.name}.{type(op).__name__}", op,
                        tuple(where[node.inputs[-1 - j]] if j < 0 else first + j
                              for j in inputs), shape))
            where[i] = len(nodes) - 1
        network = copy.copy(self)
        network.nodes, network.output = nodes, where[self.output]
        return network

    def check_supported(self, method: str) -> None:
        """UnsupportedLayerError naming the first operation that ``method`` has no exact
        rule for (each operation declares it: `Operation.refusal`)."""
        for node in self.nodes[1:]:
            reason = node.op.refusal(method)
            if reason is not None:
                raise UnsupportedLayerError(f"{reason} (node {node.name!r})")

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
        flat_args = [b for a in args for b in (a if isinstance(a, (list, tuple)) else [a])]
        deps = [a for a in flat_args if isinstance(a, fx.Node) and a in index]
        target = fx_node.target
        if fx_node.op == "call_method" and target in METHOD_ARITHMETIC:
            target = METHOD_ARITHMETIC[target]
        if not deps:  # arithmetic on constants only
            if target in (
                operator.add, operator.sub, operator.mul, operator.truediv, operator.neg
            ):
                constants[fx_node] = target(*[constants.get(a, a) for a in args])
                return
            raise UnsupportedLayerError(f"operation {fx_node.target!r} does not use the input")
        source = index[deps[0]]
        in_shape = self.nodes[source].shape

        def add(op: Operation, inputs=(source,)) -> None:
            index[fx_node] = self._add(fx_node.name, op, tuple(inputs), shape)

        if fx_node.op == "call_module":
            module = self.graph_module.get_submodule(fx_node.target)
            if isinstance(module, PASS_THROUGH):
                index[fx_node] = source
                return
            kind = MODULE_OPERATIONS.get(type(module))
            if kind is None:
                raise UnsupportedLayerError(f"unsupported {self._describe(fx_node)}")
            add(kind.from_module(module, in_shape, shape))
            return
        rule = FUNCTION_OPERATIONS.get(target) if isinstance(target, str) == (
            fx_node.op == "call_method") else None
        if rule is not None and len(deps) == 1:
            add(rule.from_module(None, in_shape, shape))
        elif fx_node.op == "call_method" and target == "contiguous":
            index[fx_node] = source
        elif target is torch.cat:
            parts = args[0]
            dim = fx_node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if not all(isinstance(p, fx.Node) and p in index for p in parts):
                raise UnsupportedLayerError(f"concatenation with a constant at {fx_node.name}")
            dim = dim % (len(shape) + 1)
            if dim == 0:
                raise UnsupportedLayerError(f"concatenation along the batch at {fx_node.name}")
            sizes = [self.nodes[index[p]].shape[dim - 1] for p in parts]
            add(Concat(dim, sizes), [index[p] for p in parts])
        elif target in (operator.add, operator.sub, torch.add, torch.sub) and not fx_node.kwargs:
            sign = -1.0 if target in (operator.sub, torch.sub) else 1.0
            if len(deps) == 2:
                shapes = {self.nodes[index[a]].shape for a in args[:2]}
                if shapes != {shape}:  # Sum's rules take both inputs at the output's shape
                    raise UnsupportedLayerError(
                        f"broadcasting addition of shapes {sorted(shapes)} at {fx_node.name}")
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
