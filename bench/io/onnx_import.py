"""ONNX networks as `torch.fx` graph modules made of the layers the engine knows.

Why a converter of our own: onnx2pytorch 0.6.0 (2021, unmaintained) builds a module whose
``forward`` interprets the ONNX graph with its own layer classes, so neither torch.fx nor
the engine's conversion table sees ordinary layers; onnx2torch needs torchvision, whose only
CPU build here does not import. The operations of verification networks are few, and this
module maps each to a standard ``nn`` layer or torch function (table `CONVERTERS`;
elementwise activations from the engine's own table, `ONNX_ACTIVATIONS`), so the result
is traced by the engine like any user network, and everything else is refused with one
line naming the operation.

Shapes. ONNX networks of the competition have a batch dimension of 1 in front; it becomes
the batch dimension of the converted module. A network whose input is a vector without
one (``[n]``) gets one in front: the converted module always takes ``(batch, *input_shape)``
and returns ``(batch, outputs)`` (outputs flattened). Constant subgraphs (``Constant``,
``Shape`` of a fixed-size tensor and arithmetic on them) are folded with onnx's reference
evaluator while converting.

`OnnxRuntime` runs the original file with onnxruntime: it is the judge of counterexamples.
"""

from __future__ import annotations

import gzip
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from certbench.errors import UserError
from certbench.verifiers.base import UnsupportedLayerError
from certbench.verifiers.bound_propagation import ONNX_ACTIVATIONS
from certbench.verifiers.bound_propagation.index_map import IndexMap


class OnnxImportError(UserError):
    """An ONNX file that cannot be read or converted (one line, exit code 2 in the CLI)."""


class UnsupportedOnnxOperation(OnnxImportError, UnsupportedLayerError):
    """An ONNX operation without a conversion (and so without a sound bound rule)."""


def read_onnx_bytes(path: str | Path) -> bytes:
    """The file's bytes, gunzipped if it ends in ``.gz``; ``x.onnx`` also finds
    ``x.onnx.gz`` (VNN-COMP 2022 lists names without ``.gz``)."""
    path = Path(path)
    if not path.exists() and Path(str(path) + ".gz").exists():
        path = Path(str(path) + ".gz")
    if not path.is_file():
        raise OnnxImportError(f"ONNX file {path} not found; check the path")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise OnnxImportError(f"{path} is not a valid gzip file ({exc})") from exc
    return data


def _load_proto(path: str | Path):
    import onnx
    from google.protobuf.message import DecodeError

    data = read_onnx_bytes(path)
    try:
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto)
    except (DecodeError, onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise OnnxImportError(
            f"{path} is not a valid ONNX model (truncated or corrupted?): {first}"
        ) from exc
    return proto


@dataclass
class OnnxNetwork:
    """A converted network: ``module`` maps (batch, *input_shape) to (batch, outputs)."""

    module: fx.GraphModule
    input_shape: tuple[int, ...]
    num_outputs: int
    input_name: str
    onnx_input_shape: tuple[int, ...]  # the shape onnxruntime takes for one sample
    path: Path


class _Converter:
    """Builds the fx graph node by node; ``examples`` holds each value for a batch of one
    (zeros in), ``onnx_shape`` gives a value's shape as ONNX sees it."""

    def __init__(self, proto, onnx_input_shape: tuple[int, ...]):
        self.opsets = {entry.domain: entry.version for entry in proto.opset_import}
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.prepended = len(onnx_input_shape) < 2 or onnx_input_shape[0] != 1
        self.values: dict[str, fx.Node] = {}
        self.examples: dict[str, torch.Tensor] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.count = 0
        from onnx import numpy_helper

        for init in proto.graph.initializer:
            self.constants[init.name] = numpy_helper.to_array(init)

    def onnx_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.examples[name].shape)
        return shape[1:] if self.prepended else shape

    def torch_dim(self, axis: int, name: str) -> int:
        """The torch dimension of an ONNX axis of value ``name``."""
        axis = axis % len(self.onnx_shape(name))
        if not self.prepended and axis == 0:
            raise UnsupportedLayerError("an operation along the batch dimension")
        return axis + 1 if self.prepended else axis

    def constant(self, value: np.ndarray) -> fx.Node:
        name = f"c{self.count}"
        self.count += 1
        self.root.register_buffer(name, _tensor(value))
        return self.graph.get_attr(name)

    def module(self, out: str, layer: nn.Module, source: str) -> None:
        name = f"m{self.count}"
        self.count += 1
        self.root.add_module(name, layer.eval())
        self.values[out] = self.graph.call_module(name, (self.values[source],))
        with torch.no_grad():
            self.examples[out] = layer(self.examples[source])

    def function(self, out: str, fn: Callable, *args) -> None:
        """``fn(*args)``, where an arg that is a value name is that node, and a numpy array
        becomes a buffer."""
        nodes, examples = [], []
        for arg in args:
            if isinstance(arg, str):
                nodes.append(self.values[arg])
                examples.append(self.examples[arg])
            elif isinstance(arg, np.ndarray):
                nodes.append(self.constant(arg))
                examples.append(_tensor(arg))
            else:
                nodes.append(arg)
                examples.append(arg)
        self.values[out] = self.graph.call_function(fn, tuple(nodes))
        with torch.no_grad():
            self.examples[out] = fn(*examples)

    def reshape_to(self, out: str, source: str, onnx_shape: Sequence[int]) -> None:
        """Reshape to an ONNX shape, keeping the batch dimension in front."""
        onnx_shape = tuple(int(s) for s in onnx_shape)
        if self.prepended:
            target = (-1, *onnx_shape)
        elif onnx_shape and onnx_shape[0] == 1:
            target = (-1, *onnx_shape[1:])
        else:
            raise UnsupportedLayerError(f"a reshape to {onnx_shape} that moves the batch dimension")
        self.function(out, torch.reshape, source, target)


def _tensor(array) -> torch.Tensor:
    """A float32 copy (ONNX initialisers are read-only numpy views)."""
    return torch.tensor(np.array(array, dtype=np.float32))


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_operand(conv: _Converter, node, position: int) -> np.ndarray:
    name = node.input[position]
    if name not in conv.constants:
        raise UnsupportedLayerError(f"{node.op_type} with a second input that depends on the input")
    return conv.constants[name]


def _gemm(conv: _Converter, node, attrs) -> None:
    if attrs.get("transA", 0):
        raise UnsupportedLayerError("Gemm with transA = 1")
    weight = _constant_operand(conv, node, 1) * attrs.get("alpha", 1.0)
    weight = weight if attrs.get("transB", 0) else weight.T
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=len(node.input) > 2)
    layer.weight.data = _tensor(weight)
    if len(node.input) > 2:
        bias = _constant_operand(conv, node, 2) * attrs.get("beta", 1.0)
        layer.bias.data = _tensor(np.broadcast_to(bias, (1, weight.shape[0])).reshape(-1))
    conv.module(node.output[0], layer, node.input[0])


def _matmul(conv: _Converter, node, attrs) -> None:
    """x @ W, or W @ x for a vector x (as in VNN-COMP's test networks): a dense layer."""
    a, b = node.input
    if a in conv.values and b in conv.constants:
        source, weight = a, conv.constants[b].T
    elif b in conv.values and a in conv.constants and len(conv.onnx_shape(b)) == 1:
        source, weight = b, conv.constants[a]
    else:
        raise UnsupportedLayerError("MatMul other than input-dependent x times constant W")
    if weight.ndim != 2:
        raise UnsupportedLayerError(f"MatMul with a {weight.ndim}-D weight")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = _tensor(weight)
    conv.module(node.output[0], layer, source)


def _arithmetic(fn: Callable, linear_in_both: bool) -> Callable:
    """Add, Sub (both operands may depend on the input), Mul, Div (one constant)."""

    def convert(conv: _Converter, node, attrs) -> None:
        a, b = node.input
        if a in conv.values and b in conv.values:
            if not linear_in_both:
                raise UnsupportedLayerError(f"{node.op_type} of two input-dependent tensors")
            conv.function(node.output[0], fn, a, b)
            return
        if b not in conv.values and fn is operator.truediv:
            conv.function(node.output[0], fn, a, conv.constants[b])
            return
        if a not in conv.values and fn is operator.truediv:
            raise UnsupportedLayerError("Div by an input-dependent tensor")
        args = [x if x in conv.values else conv.constants[x] for x in (a, b)]
        conv.function(node.output[0], fn, *args)

    return convert


def _conv(conv: _Converter, node, attrs) -> None:
    weight = _constant_operand(conv, node, 1)
    if weight.ndim != 4 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedLayerError("Conv other than 2-D with explicit pads")
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise UnsupportedLayerError(f"Conv with asymmetric pads {pads}")
    layer = nn.Conv2d(
        weight.shape[1] * attrs.get("group", 1), weight.shape[0], tuple(weight.shape[2:]),
        stride=tuple(attrs.get("strides", [1, 1])), padding=tuple(pads[:2]),
        dilation=tuple(attrs.get("dilations", [1, 1])), groups=attrs.get("group", 1),
        bias=len(node.input) > 2,
    )
    layer.weight.data = _tensor(weight)
    if len(node.input) > 2:
        layer.bias.data = _tensor(_constant_operand(conv, node, 2))
    conv.module(node.output[0], layer, node.input[0])


def _conv_transpose(conv: _Converter, node, attrs) -> None:
    weight = _constant_operand(conv, node, 1)
    if weight.ndim != 4 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedLayerError("ConvTranspose other than 2-D with explicit pads")
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:] or "output_shape" in attrs:
        raise UnsupportedLayerError(f"ConvTranspose with asymmetric pads {pads} or an "
                                    "output_shape")
    groups = attrs.get("group", 1)
    layer = nn.ConvTranspose2d(
        weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]),
        stride=tuple(attrs.get("strides", [1, 1])), padding=tuple(pads[:2]),
        output_padding=tuple(attrs.get("output_padding", [0, 0])), groups=groups,
        dilation=tuple(attrs.get("dilations", [1, 1])), bias=len(node.input) > 2)
    layer.weight.data = _tensor(weight)
    if len(node.input) > 2:
        layer.bias.data = _tensor(_constant_operand(conv, node, 2))
    conv.module(node.output[0], layer, node.input[0])


def _batchnorm(conv: _Converter, node, attrs) -> None:
    scale, bias, mean, var = (_constant_operand(conv, node, i) for i in range(1, 5))
    rank = len(conv.onnx_shape(node.input[0]))
    kind = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d
    layer = kind(len(scale), eps=attrs.get("epsilon", 1e-5))
    for target, value in ((layer.weight, scale), (layer.bias, bias),
                          (layer.running_mean, mean), (layer.running_var, var)):
        target.data = _tensor(value)
    conv.module(node.output[0], layer, node.input[0])


def _pool(kind: str) -> Callable:
    def convert(conv: _Converter, node, attrs) -> None:
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:] or any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise UnsupportedLayerError(f"{node.op_type} with asymmetric pads or dilation")
        kernel = tuple(attrs["kernel_shape"])
        stride = tuple(attrs.get("strides", [1, 1]))
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            layer = nn.MaxPool2d(kernel, stride, tuple(pads[:2]), ceil_mode=ceil)
        else:
            if any(pads) and not attrs.get("count_include_pad", 0):
                raise UnsupportedLayerError("AveragePool with padding excluded from the count")
            layer = nn.AvgPool2d(kernel, stride, tuple(pads[:2]), ceil_mode=ceil)
        conv.module(node.output[0], layer, node.input[0])

    return convert


def _reshape_like(shape_of: Callable) -> Callable:
    """Flatten, Reshape, Squeeze, Unsqueeze: the ONNX output shape computed on the example,
    then one reshape that keeps the batch dimension in front."""

    def convert(conv: _Converter, node, attrs) -> None:
        in_shape = conv.onnx_shape(node.input[0])
        out_shape = shape_of(conv, node, attrs, in_shape)
        conv.reshape_to(node.output[0], node.input[0], out_shape)

    return convert


def _flatten_shape(conv, node, attrs, shape):
    axis = attrs.get("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    return (math.prod(shape[:axis]), math.prod(shape[axis:]))


def _reshape_shape(conv, node, attrs, shape):
    target = [int(s) for s in _constant_operand(conv, node, 1)]
    target = [shape[i] if s == 0 and not attrs.get("allowzero", 0) else s
              for i, s in enumerate(target)]
    return np.zeros(shape).reshape(target).shape


def _axes(conv, node, attrs):
    if len(node.input) > 1:
        return [int(a) for a in _constant_operand(conv, node, 1)]
    return list(attrs.get("axes", []))


def _squeeze_shape(conv, node, attrs, shape):
    axes = _axes(conv, node, attrs) or [i for i, s in enumerate(shape) if s == 1]
    return np.squeeze(np.zeros(shape), axis=tuple(axes)).shape


def _unsqueeze_shape(conv, node, attrs, shape):
    return np.expand_dims(np.zeros(shape), axis=tuple(_axes(conv, node, attrs))).shape


def _concat(conv: _Converter, node, attrs) -> None:
    parts = list(node.input)
    if not all(p in conv.values for p in parts):
        raise UnsupportedLayerError("Concat with a constant part")
    dim = conv.torch_dim(attrs["axis"], parts[0])
    name = node.output[0]
    conv.values[name] = conv.graph.call_function(torch.cat, ([conv.values[p] for p in parts], dim))
    conv.examples[name] = torch.cat([conv.examples[p] for p in parts], dim)


def _activation(conv: _Converter, node, attrs) -> None:
    """An elementwise activation of the engine's table (`ONNX_ACTIVATIONS`)."""
    conv.module(node.output[0], ONNX_ACTIVATIONS[node.op_type](attrs), node.input[0])


SELECTIONS = {"Slice", "Gather", "Split", "Transpose", "Pad", "Resize", "Tile", "Expand",
              "DepthToSpace", "SpaceToDepth"}
"""Operations whose every output entry is one entry of the data input or a constant (a
pad value): converted to an `IndexMap` by running them on the entries' indices."""


def _batch_free(conv: _Converter, shape: tuple[int, ...], node) -> tuple[int, ...]:
    """An ONNX output shape without its batch dimension of 1 (UnsupportedLayerError if the
    operation moved the batch elsewhere)."""
    if conv.prepended:
        return shape
    if not shape or shape[0] != 1:
        raise UnsupportedLayerError(f"{node.op_type} that moves the batch dimension "
                                    f"(output shape {list(shape)})")
    return shape[1:]


def _run_node(conv: _Converter, node, data: np.ndarray,
              replace: dict[int, np.ndarray] | None = None) -> list[np.ndarray]:
    """The node's outputs with ``data`` as its first input and the other inputs constant."""
    from onnx.reference import ReferenceEvaluator

    inputs = {node.input[0]: data}
    for position, name in enumerate(node.input[1:], start=1):
        if not name:
            continue
        if name not in conv.constants:
            raise UnsupportedLayerError(f"{node.op_type} whose input {position} depends on the "
                                        "network's input")
        inputs[name] = (replace or {}).get(position, conv.constants[name])
    return ReferenceEvaluator(node, opsets=conv.opsets).run(None, inputs)


def _selection(conv: _Converter, node, attrs) -> None:
    """Slice, Gather, Split, ... as `IndexMap`s: the operation is run on the entries'
    numbers 1..n (float64, exact), so each output entry names its source (0: a pad), and
    checked once more on a random permutation of them."""
    if node.input[0] not in conv.values:
        raise UnsupportedLayerError(f"{node.op_type} of a constant at input-dependent indices")
    if node.op_type == "Resize" and attrs.get("mode", b"nearest") not in (b"nearest", "nearest"):
        raise UnsupportedLayerError(f"Resize in mode {attrs['mode']!r} (only nearest copies "
                                    "entries; interpolation has no rule here)")
    shape = conv.onnx_shape(node.input[0])
    n = math.prod(shape)
    numbers = np.arange(1, n + 1, dtype=np.float64).reshape(shape)
    pad_value, replace = 0.0, None
    if node.op_type == "Pad" and attrs.get("mode", b"constant") in (b"constant", "constant"):
        if attrs.get("value", 0.0):
            raise UnsupportedLayerError("Pad (opset < 11) with a non-zero value attribute")
        if len(node.input) > 2 and node.input[2]:  # the pad value: probed as 0, then added
            value = _constant_operand(conv, node, 2)
            pad_value, replace = float(np.reshape(value, -1)[0]), {2: np.zeros_like(value)}
    outputs = _run_node(conv, node, numbers, replace)
    check = np.random.default_rng(0).permutation(n).astype(np.float64).reshape(shape) + 1
    checks = _run_node(conv, node, check, replace)
    for name, out, out_check in zip(node.output, outputs, checks, strict=True):
        out = np.asarray(out, dtype=np.float64)
        values = out.reshape(-1)
        if (values != np.round(values)).any() or (values < 0).any() or (values > n).any():
            raise UnsupportedLayerError(f"{node.op_type} that does not copy entries")
        taken = values > 0
        in_index = values[taken].astype(np.int64) - 1
        expected = np.where(taken, check.reshape(-1)[np.maximum(values.astype(np.int64) - 1, 0)],
                            0.0)
        if not np.array_equal(np.asarray(out_check, dtype=np.float64).reshape(-1), expected):
            raise UnsupportedLayerError(f"{node.op_type} whose output is not a selection")
        out_shape = _batch_free(conv, tuple(out.shape), node)
        layer = IndexMap(torch.from_numpy(np.flatnonzero(taken)), torch.from_numpy(in_index),
                         torch.ones(len(in_index)),
                         torch.from_numpy(np.where(taken, 0.0, pad_value)),
                         conv.examples[node.input[0]].shape[1:], out_shape)
        conv.module(name, layer, node.input[0])


def _reduce(conv: _Converter, node, attrs) -> None:
    """ReduceSum / ReduceMean over constant axes (not the batch) as an `IndexMap`."""
    shape = conv.onnx_shape(node.input[0])
    if len(node.input) > 1 and node.input[1]:
        axes = [int(a) for a in _constant_operand(conv, node, 1)]
    else:
        axes = list(attrs.get("axes", []))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            _identity(conv, node, attrs)
            return
        axes = list(range(len(shape)))
    torch_axes = sorted({conv.torch_dim(a, node.input[0]) - 1 for a in axes})
    in_shape = tuple(conv.examples[node.input[0]].shape[1:])
    kept = tuple(1 if i in torch_axes else size for i, size in enumerate(in_shape))
    out_index = np.broadcast_to(np.arange(math.prod(kept)).reshape(kept), in_shape).reshape(-1)
    count = math.prod(in_shape) // math.prod(kept)
    weight = 1.0 if node.op_type == "ReduceSum" else 1.0 / count
    out_shape = kept if attrs.get("keepdims", 1) else tuple(
        size for i, size in enumerate(in_shape) if i not in torch_axes)
    layer = IndexMap(torch.from_numpy(out_index.copy()), torch.arange(len(out_index)),
                     torch.full((len(out_index),), weight), torch.zeros(math.prod(kept)),
                     in_shape, out_shape)
    conv.module(node.output[0], layer, node.input[0])


def _identity(conv: _Converter, node, attrs) -> None:
    conv.values[node.output[0]] = conv.values[node.input[0]]
    conv.examples[node.output[0]] = conv.examples[node.input[0]]


def _shape(conv: _Converter, node, attrs) -> None:
    """Shape of an input-dependent tensor: a constant, since shapes here are fixed."""
    conv.constants[node.output[0]] = np.array(conv.onnx_shape(node.input[0]), dtype=np.int64)


CONVERTERS: dict[str, Callable] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _arithmetic(operator.add, True),
    "Sub": _arithmetic(operator.sub, True),
    "Mul": _arithmetic(operator.mul, False),
    "Div": _arithmetic(operator.truediv, False),
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batchnorm,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda c, n, a: c.module(n.output[0], nn.AdaptiveAvgPool2d(1),
                                                  n.input[0]),
    "Flatten": _reshape_like(_flatten_shape),
    "Reshape": _reshape_like(_reshape_shape),
    "Squeeze": _reshape_like(_squeeze_shape),
    "Unsqueeze": _reshape_like(_unsqueeze_shape),
    "Concat": _concat,
    "Identity": _identity,
    "Dropout": _identity,
    "Shape": _shape,
    "ReduceSum": _reduce,
    "ReduceMean": _reduce,
    **dict.fromkeys(SELECTIONS, _selection),
}
"""ONNX operation -> converter for the structural operations; elementwise activations come
from the engine's `ONNX_ACTIVATIONS` (the operation's own place)."""


def _fold(conv: _Converter, node, opsets: dict[str, int]) -> None:
    """Evaluate a node whose inputs are all constants with onnx's reference evaluator, at
    the model's opset (operations changed their signatures between opsets)."""
    from onnx.reference import ReferenceEvaluator

    inputs = {name: conv.constants[name] for name in node.input if name}
    axes = _attributes(node).get("axes")
    if node.op_type in ("Unsqueeze", "Squeeze") and axes is not None:
        # before opset 13 axes is an attribute, which onnx's reference evaluator mishandles
        value = conv.constants[node.input[0]]
        fold = np.expand_dims if node.op_type == "Unsqueeze" else np.squeeze
        conv.constants[node.output[0]] = fold(value, axis=tuple(axes))
        return
    outputs = ReferenceEvaluator(node, opsets=opsets).run(None, inputs)
    conv.constants.update(zip(node.output, outputs, strict=False))


def _dims(value_info, path) -> tuple[int, ...]:
    """The input's shape; a symbolic or unknown size is allowed only in front (batch)."""
    dims = list(value_info.type.tensor_type.shape.dim)
    sizes = [d.dim_value if d.dim_value > 0 else None for d in dims]
    if None in sizes[1:]:
        names = [d.dim_param or "?" for d in dims]
        raise OnnxImportError(f"{path}: input shape {names} has a symbolic size after the "
                              "batch dimension; certbench needs fixed input sizes (export "
                              "the network with a fixed input shape)")
    return tuple(s if s is not None else 1 for s in sizes)


def load_onnx(path: str | Path) -> OnnxNetwork:
    """Convert the ONNX network at ``path`` (``.onnx`` or ``.onnx.gz``); OnnxImportError
    (a user error) if it cannot be read or has an operation without a conversion."""
    proto = _load_proto(path)
    graph = proto.graph
    initialised = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialised]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise OnnxImportError(
            f"{path}: certbench takes networks with one input and one output; this one has "
            f"{len(inputs)} inputs and {len(graph.output)} outputs"
        )
    onnx_shape = _dims(inputs[0], path)
    conv = _Converter(proto, onnx_shape)
    name = inputs[0].name
    conv.values[name] = conv.graph.placeholder("x")
    conv.examples[name] = torch.zeros(onnx_shape if not conv.prepended else (1, *onnx_shape))
    for node in graph.node:
        if node.op_type == "Constant" or all(i in conv.constants for i in node.input if i):
            _fold(conv, node, conv.opsets)
            continue
        converter = CONVERTERS.get(node.op_type)
        if node.op_type in ONNX_ACTIVATIONS:
            converter = _activation
        try:
            if converter is None:
                raise UnsupportedLayerError("it has no conversion and no sound bound rule")
            converter(conv, node, _attributes(node))
        except UnsupportedLayerError as exc:
            raise UnsupportedOnnxOperation(
                f"{path}: unsupported ONNX operation {node.op_type!r} (node {node.name!r}): "
                f"{exc}; supported: {', '.join(sorted([*CONVERTERS, *ONNX_ACTIVATIONS]))}"
            ) from exc
    out = graph.output[0].name
    flat = math.prod(conv.onnx_shape(out))
    if conv.examples[out].dim() != 2:
        conv.function("__output__", torch.reshape, out, (-1, flat))
        out = "__output__"
    conv.graph.output(conv.values[out])
    module = fx.GraphModule(conv.root, conv.graph).eval()
    input_shape = onnx_shape if conv.prepended else onnx_shape[1:]
    return OnnxNetwork(module, tuple(input_shape), flat, name, tuple(onnx_shape), Path(path))


class OnnxRuntime:
    """The original ONNX network under onnxruntime (CPU), one sample at a time, float32:
    the judge of every counterexample certbench reports."""

    def __init__(self, network: OnnxNetwork):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(
            read_onnx_bytes(network.path), options, providers=["CPUExecutionProvider"])
        self.network = network
        self.dtype = np.float64 if "double" in self.session.get_inputs()[0].type else np.float32

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Outputs (batch, num_outputs) for inputs (batch, *input_shape)."""
        x = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, dtype=self.dtype)
        rows = [
            self.session.run(None, {self.network.input_name:
                                    sample.reshape(self.network.onnx_input_shape)})[0]
            for sample in x
        ]
        return np.stack([r.reshape(-1) for r in rows]).astype(np.float64)


def as_classifier(
    network: OnnxNetwork, input_shape: Sequence[int], num_classes: int,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
) -> nn.Sequential:
    """The network as a classifier of a dataset's images in [0, 1]: ``Normalize(mean, std)``
    in front if given (the network expects normalised inputs), and a reshape if the
    network reads the same pixels in another shape (VNN-COMP's MNIST nets take
    ``[784, 1]``). OnnxImportError if sizes or the number of classes disagree."""
    from certbench.models import Normalize

    input_shape = tuple(input_shape)
    layers: list[nn.Module] = []
    if (mean is None) != (std is None):
        raise OnnxImportError(f"{network.path}: give both mean and std for the normalization")
    if mean is not None:
        if len(mean) not in (1, input_shape[0]) or len(std) != len(mean):
            raise OnnxImportError(
                f"{network.path}: normalization has {len(mean)} mean(s) and {len(std)} std(s) "
                f"for {input_shape[0]} channels; give one per channel")
        layers.append(Normalize(mean, std))
    if input_shape != network.input_shape:
        if math.prod(input_shape) != math.prod(network.input_shape):
            raise OnnxImportError(
                f"{network.path} takes inputs of shape {list(network.input_shape)}, the "
                f"dataset has {list(input_shape)}: is this network for another dataset?")
        layers += [nn.Flatten(), nn.Unflatten(1, network.input_shape)]
    if network.num_outputs != num_classes:
        raise OnnxImportError(f"{network.path} has {network.num_outputs} outputs, the dataset "
                              f"{num_classes} classes")
    return nn.Sequential(*layers, network.module).eval()
