"""ONNX import: converted networks compute what onnxruntime computes (the competition's
networks and hand-built ones that use every conversion), the engine's CROWN bounds on
them contain onnxruntime's outputs, and unreadable or unsupported files give one-line
user errors that name the file."""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from certbench.errors import UserError
from certbench.io.onnx_import import (
    CONVERTERS,
    OnnxImportError,
    OnnxNetwork,
    OnnxRuntime,
    UnsupportedOnnxOperation,
    as_classifier,
    load_onnx,
    read_onnx_bytes,
)
from certbench.verifiers.base import UnsupportedLayerError
from certbench.verifiers.bound_propagation.graph import TracedNetwork
from certbench.verifiers.bound_propagation.propagation import Ball, BoundPropagator
from conftest import SHARED_DATA

TOL = 1e-5
NO_DATA = f"VNN-COMP networks not found under {SHARED_DATA} (the shared data folder)"
VNNCOMP = [SHARED_DATA / "vnncomp2021", SHARED_DATA / "vnncomp2022"]
SHARED_NETWORKS = sorted(path for root in VNNCOMP if root.is_dir() for path in root.rglob("*")
                         if path.name.endswith((".onnx", ".onnx.gz")))
MNIST_IMAGES = SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz"
needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason=NO_DATA)


# -- helpers ---------------------------------------------------------------------------

def save_model(path: Path, nodes: list, weights: dict[str, np.ndarray], input_shape: list,
               output_shape: list, opset: int = 13) -> Path:
    """A one-input ("x"), one-output ("y") model, checked by onnx and saved at ``path``."""
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def random_inputs(network: OnnxNetwork, count: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, *network.input_shape, generator=torch.Generator().manual_seed(seed))


def assert_matches_onnxruntime(network: OnnxNetwork, x: torch.Tensor) -> None:
    with torch.no_grad():
        ours = network.module(x).double().numpy()
    theirs = OnnxRuntime(network)(x)
    assert ours.shape == theirs.shape == (len(x), network.num_outputs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


def assert_crown_contains_onnxruntime(network: OnnxNetwork, center: torch.Tensor, eps: float,
                                      points: int = 500, corners: int = 64) -> None:
    """CROWN lower bounds of the outputs (identity rows) and upper bounds (negated rows)
    over the l_inf box contain onnxruntime's outputs at the centre, at ``points`` uniform
    points of the box and at ``corners`` of its corners."""
    n = network.num_outputs
    propagator = BoundPropagator(TracedNetwork(network.module, network.input_shape))
    eye = torch.eye(n)[None]
    with torch.no_grad():
        bounds = propagator.lower_bound(torch.cat([eye, -eye], 1),
                                        Ball(center, eps, "inf", clip=False), "crown")[0]
    lower, upper = bounds[:n].double().numpy(), -bounds[n:].double().numpy()
    gen = torch.Generator().manual_seed(1)
    shape = center.shape[1:]
    inside = center + eps * (2 * torch.rand(points, *shape, generator=gen) - 1)
    signs = 2.0 * torch.randint(0, 2, (corners, *shape), generator=gen) - 1
    outputs = OnnxRuntime(network)(torch.cat([center, inside, center + eps * signs]))
    below, above = lower - outputs, outputs - upper
    assert below.max() <= TOL, f"an output below its lower bound by {below.max():.3g}"
    assert above.max() <= TOL, f"an output above its upper bound by {above.max():.3g}"


def assert_one_line_error(error: Exception, path: Path) -> str:
    message = str(error)
    assert isinstance(error, OnnxImportError) and isinstance(error, UserError)
    assert str(path) in message and "\n" not in message
    return message


# -- the competition's networks --------------------------------------------------------

@needs_data
@pytest.mark.parametrize("path", SHARED_NETWORKS,
                         ids=[str(p.relative_to(SHARED_DATA)) for p in SHARED_NETWORKS])
def test_shared_network_matches_onnxruntime_or_is_refused_in_one_line(path: Path):
    """Every competition network loads, matches onnxruntime and traces, or is refused with
    one line naming an operation the file uses that certbench cannot convert."""
    try:
        network = load_onnx(path)
    except UnsupportedOnnxOperation as exc:
        used = {node.op_type for node in onnx.load_from_string(read_onnx_bytes(path)).graph.node}
        named = re.search(r"unsupported ONNX operation '(\w+)'", str(exc))
        assert named and named.group(1) in used and "\n" not in str(exc), str(exc)
        return
    assert_matches_onnxruntime(network, random_inputs(network))
    TracedNetwork(network.module, network.input_shape)


def mnist_image(index: int) -> torch.Tensor:
    """A test image of MNIST in [0, 1], shape (1, 784): MNIST networks are constant on
    uniform random points (every first-layer ReLU of mnist-net_256x2 is off there)."""
    if not MNIST_IMAGES.exists():
        pytest.skip(f"MNIST files not found in {MNIST_IMAGES.parent} (the shared data folder)")
    pixels = np.frombuffer(gzip.decompress(MNIST_IMAGES.read_bytes()), np.uint8, offset=16)
    return torch.tensor(pixels[784 * index: 784 * (index + 1)] / 255.0,
                        dtype=torch.float32)[None]


@needs_data
@pytest.mark.parametrize("name, eps, center", [
    ("mnistfc/mnist-net_256x2.onnx", 0.01, "mnist"),
    ("test/test_small.onnx", 0.5, "uniform"),
    ("eran/nets/ffnnSIGMOID__Point_6x200.onnx", 0.01, "mnist"),
    # at 0.01 the sigmoid net's CROWN bounds are hundreds wide; 0.001 gives tight ones
    ("eran/nets/ffnnSIGMOID__Point_6x200.onnx", 0.001, "mnist"),
])
def test_crown_bounds_contain_onnxruntime_outputs_on_shared_networks(name: str, eps: float,
                                                                      center: str):
    network = load_onnx(SHARED_DATA / "vnncomp2021" / name)
    if center == "mnist":
        x0 = mnist_image(int(np.random.default_rng(0).integers(100)))
        x0 = x0.reshape(1, *network.input_shape)
    else:
        x0 = random_inputs(network, count=1)
    assert_crown_contains_onnxruntime(network, x0, eps)


# -- hand-built networks: every conversion --------------------------------------------

def weights(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def cnn(path: Path) -> Path:
    """Normalisation, strided padded conv, BatchNorm, two conv branches (max and average
    pooled) concatenated on channels, a reshape to (batch, -1) whose shape is computed
    from Shape, Gemm, MatMul + Add, Mul, Tanh, Sigmoid, Unsqueeze/Squeeze, Dropout."""
    rng = np.random.default_rng(0)
    node = helper.make_node
    nodes = [
        node("Sub", ["x", "mean"], ["centred"]),
        node("Div", ["centred", "std"], ["normalised"]),
        node("Conv", ["normalised", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"]),
        node("Relu", ["bn"], ["r1"]),
        node("Conv", ["r1", "wa"], ["a"], pads=[1, 1, 1, 1]),
        node("MaxPool", ["a"], ["pa"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["r1", "wb", "bb"], ["b"]),
        node("AveragePool", ["b"], ["pb"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Concat", ["pa", "pb"], ["cat"], axis=1),
        node("Identity", ["cat"], ["features"]),
        node("Shape", ["features"], ["shape"]),
        node("Gather", ["shape", "zero"], ["batch"], axis=0),
        node("Unsqueeze", ["batch", "axis0"], ["batch1"]),
        node("Concat", ["batch1", "minus_one"], ["target"], axis=0),
        node("Reshape", ["features", "target"], ["flat"]),
        node("Gemm", ["flat", "wg", "bg"], ["g"], transB=1, alpha=0.7, beta=1.3),
        node("Tanh", ["g"], ["t"]),
        node("MatMul", ["t", "wm"], ["m"]),
        node("Add", ["m", "bm"], ["mb"]),
        node("Mul", ["mb", "scale"], ["scaled"]),
        node("Sigmoid", ["scaled"], ["s"]),
        node("Unsqueeze", ["s", "axis2"], ["s3"]),
        node("Squeeze", ["s3", "axis2"], ["s2"]),
        node("Dropout", ["s2"], ["y"]),
    ]
    values = {
        "mean": np.array([0.4, 0.5, 0.6], np.float32).reshape(1, 3, 1, 1),
        "std": np.array([0.2, 0.3, 0.25], np.float32).reshape(1, 3, 1, 1),
        "w1": weights(rng, 4, 3, 3, 3), "b1": weights(rng, 4),
        "bn_scale": rng.uniform(0.5, 1.5, 4).astype(np.float32), "bn_bias": weights(rng, 4),
        "bn_mean": weights(rng, 4), "bn_var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        "wa": weights(rng, 2, 4, 3, 3), "wb": weights(rng, 3, 4, 1, 1), "bb": weights(rng, 3),
        "zero": np.array(0, np.int64), "axis0": ints(0), "minus_one": ints(-1), "axis2": ints(2),
        "wg": weights(rng, 16, 20), "bg": weights(rng, 16),
        "wm": weights(rng, 16, 12), "bm": weights(rng, 12), "scale": weights(rng, 12, scale=2),
    }
    return save_model(path, nodes, values, [1, 3, 8, 8], [1, 12])


def residual(path: Path) -> Path:
    """A conv with a non-square kernel and different pads per axis, a residual sum and a
    difference of two input-dependent tensors, GlobalAveragePool, Flatten, Gemm with
    transB = 0."""
    rng = np.random.default_rng(1)
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 2, 1, 2], kernel_shape=[3, 2]),
        node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "w2"], ["c2"]),
        node("Add", ["r1", "c2"], ["sum"]),
        node("Relu", ["sum"], ["r2"]),
        node("Sub", ["r2", "c2"], ["difference"]),
        node("GlobalAveragePool", ["difference"], ["pooled"]),
        node("Flatten", ["pooled"], ["flat"], axis=1),
        node("Gemm", ["flat", "wg", "bg"], ["y"], alpha=1.5),
    ]
    values = {"w1": weights(rng, 3, 2, 3, 2), "b1": weights(rng, 3),
              "w2": weights(rng, 3, 3, 1, 1), "wg": weights(rng, 3, 5), "bg": weights(rng, 5)}
    return save_model(path, nodes, values, [1, 2, 6, 6], [1, 5])


def vector(path: Path) -> Path:
    """Input a plain vector [5] without batch dimension, layers W @ x + b (as the
    competition's test networks)."""
    rng = np.random.default_rng(2)
    node = helper.make_node
    nodes = [node("MatMul", ["w0", "x"], ["m0"]), node("Add", ["m0", "b0"], ["h0"]),
             node("Relu", ["h0"], ["r0"]), node("MatMul", ["w1", "r0"], ["m1"]),
             node("Add", ["m1", "b1"], ["y"])]
    values = {"w0": weights(rng, 4, 5), "b0": weights(rng, 4), "w1": weights(rng, 3, 4),
              "b1": weights(rng, 3)}
    return save_model(path, nodes, values, [5], [3])


def structural(path: Path) -> Path:
    """Every entry-copying operation (`IndexMap`s) between a conv and a dense layer: Slice
    with steps, Transpose, Pad with a non-zero value, Split, Gather, Expand, Resize
    (nearest), SpaceToDepth, DepthToSpace, Tile, ReduceMean, ReduceSum."""
    rng = np.random.default_rng(8)
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        node("Relu", ["c"], ["r"]),
        node("Slice", ["r", "starts", "ends", "slice_axes", "steps"], ["s"]),
        node("Transpose", ["s"], ["t"], perm=[0, 1, 3, 2]),
        node("Pad", ["t", "pads", "pad_value"], ["p"]),
        node("Split", ["p", "split"], ["p1", "p2"], axis=1),
        node("Gather", ["p2", "picks"], ["g"], axis=1),
        node("Expand", ["p1", "expanded"], ["e"]),
        node("Add", ["g", "e"], ["ge"]),
        node("Resize", ["ge", "", "scales"], ["rs"], mode="nearest"),
        node("SpaceToDepth", ["rs"], ["sd"], blocksize=2),
        node("DepthToSpace", ["sd"], ["ds"], blocksize=2),
        node("Tile", ["ds", "repeats"], ["ti"]),
        node("ReduceMean", ["ti"], ["rm"], axes=[3], keepdims=1),
        node("ReduceSum", ["ti", "sum_axes"], ["rsum"], keepdims=0),
        node("Relu", ["rsum"], ["rr"]),
        node("Flatten", ["rm"], ["f1"]),
        node("Flatten", ["rr"], ["f2"]),
        node("Concat", ["f1", "f2"], ["cat"], axis=1),
        node("MatMul", ["cat", "wd"], ["y"]),
    ]
    values = {"w1": weights(rng, 4, 2, 3, 3), "b1": weights(rng, 4),
              "starts": ints(1, 0), "ends": ints(4, 6), "slice_axes": ints(1, 3),
              "steps": ints(1, 2), "pads": ints(0, 0, 1, 0, 0, 0, 0, 1),
              "pad_value": np.array(0.5, np.float32), "split": ints(1, 2),
              "picks": ints(1, 0, 1), "expanded": ints(1, 3, 4, 5),
              "scales": np.array([1, 1, 2, 2], np.float32), "repeats": ints(1, 1, 1, 2),
              "sum_axes": ints(2), "wd": weights(rng, 84, 3, scale=0.02)}
    return save_model(path, nodes, values, [1, 2, 4, 6], [1, 3])


def upsampling(path: Path) -> Path:
    """A U-Net's up path: Conv, Relu, ConvTranspose with stride, padding and output
    padding, a grouped ConvTranspose with dilation, Relu, Flatten, Gemm."""
    rng = np.random.default_rng(9)
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["c"], ["r"]),
        node("ConvTranspose", ["r", "wt", "bt"], ["u"], strides=[2, 2], pads=[1, 1, 1, 1],
             output_padding=[1, 1]),
        node("ConvTranspose", ["u", "wg"], ["v"], group=2, dilations=[1, 2]),
        node("Relu", ["v"], ["rv"]),
        node("Flatten", ["rv"], ["f"]),
        node("Gemm", ["f", "wd", "bd"], ["y"], transB=1),
    ]
    values = {"w1": weights(rng, 4, 2, 3, 3), "b1": weights(rng, 4),
              "wt": weights(rng, 4, 4, 3, 3), "bt": weights(rng, 4),
              "wg": weights(rng, 4, 1, 2, 2), "wd": weights(rng, 3, 2 * 7 * 8, scale=0.1),
              "bd": weights(rng, 3)}
    return save_model(path, nodes, values, [1, 2, 6, 6], [1, 3])


HAND_BUILT: dict[str, Callable[[Path], Path]] = {"cnn": cnn, "residual": residual,
                                                  "vector": vector, "structural": structural,
                                                  "upsampling": upsampling}


def test_hand_built_networks_exercise_every_converter(tmp_path, monkeypatch):
    used: set[str] = set()
    for op, convert in list(CONVERTERS.items()):
        def recording(conv, node, attrs, op=op, convert=convert):
            used.add(op)
            return convert(conv, node, attrs)
        monkeypatch.setitem(CONVERTERS, op, recording)
    for name, build in HAND_BUILT.items():
        load_onnx(build(tmp_path / f"{name}.onnx"))
    assert used == set(CONVERTERS)


@pytest.mark.parametrize("name", HAND_BUILT)
def test_hand_built_network_matches_onnxruntime(tmp_path, name: str):
    network = load_onnx(HAND_BUILT[name](tmp_path / f"{name}.onnx"))
    if name == "vector":
        assert network.input_shape == (5,) and network.onnx_input_shape == (5,)
    assert_matches_onnxruntime(network, random_inputs(network))


@pytest.mark.parametrize("name", HAND_BUILT)
def test_crown_bounds_contain_onnxruntime_outputs_on_hand_built(tmp_path, name: str):
    network = load_onnx(HAND_BUILT[name](tmp_path / f"{name}.onnx"))
    assert_crown_contains_onnxruntime(network, random_inputs(network, count=1), 0.05)


def single(op: str, inputs: list[str], **attributes) -> list:
    return [helper.make_node(op, ["x", *inputs], ["y"], **attributes)]


LAYER_VARIANTS = {  # nodes, weights, input shape, output shape
    "conv-strided-dilated-grouped": (
        single("Conv", ["w", "b"], pads=[1, 2, 1, 2], strides=[2, 1], dilations=[1, 2], group=2),
        {"w": weights(np.random.default_rng(3), 6, 2, 3, 2), "b": np.ones(6, np.float32)},
        [1, 4, 7, 7], [1, 6, 4, 9]),
    "maxpool-padded-ceil": (
        single("MaxPool", [], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
               ceil_mode=1), {}, [1, 2, 6, 6], [1, 2, 4, 4]),
    "maxpool-default-stride": (
        single("MaxPool", [], kernel_shape=[2, 3]), {}, [1, 2, 5, 5], [1, 2, 4, 3]),
    "averagepool-padding-counted": (
        single("AveragePool", [], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
               count_include_pad=1), {}, [1, 2, 6, 6], [1, 2, 3, 3]),
    "averagepool-ceil": (
        single("AveragePool", [], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), {},
        [1, 2, 6, 6], [1, 2, 3, 3]),
    "reshape-copying-a-dimension": (
        single("Reshape", ["shape"]), {"shape": ints(0, -1)}, [1, 2, 3, 3], [1, 18]),
    "squeeze-negative-axis": (
        single("Squeeze", ["axes"]), {"axes": ints(-1)}, [1, 3, 1], [1, 3]),
    "unsqueeze-negative-axis": (
        single("Unsqueeze", ["axes"]), {"axes": ints(-1)}, [1, 3], [1, 3, 1]),
    "concat-negative-axis": (
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Concat", ["x", "r"], ["y"], axis=-3)], {}, [1, 2, 3, 3], [1, 4, 3, 3]),
    "batchnorm-after-dense": (
        [helper.make_node("Gemm", ["x", "w", "b"], ["g"]),
         helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["y"])],
        {"w": weights(np.random.default_rng(4), 3, 4), "b": np.full(4, 0.1, np.float32),
         "s": np.full(4, 1.5, np.float32), "m": np.full(4, -0.2, np.float32),
         "v": np.full(4, 0.5, np.float32)}, [1, 3], [1, 4]),
    "matmul-on-last-axis": (
        single("MatMul", ["w"]), {"w": weights(np.random.default_rng(5), 3, 4)}, [1, 2, 3],
        [1, 2, 4]),
    "vector-times-matrix": (
        single("MatMul", ["w"]), {"w": weights(np.random.default_rng(6), 5, 4)}, [5], [4]),
}


ENGINE_REFUSES = {"maxpool-padded-ceil"}  # the engine has no bound rule for ceil_mode


@pytest.mark.parametrize("variant", LAYER_VARIANTS)
def test_layer_variant_matches_onnxruntime(tmp_path, variant: str):
    network = load_onnx(save_model(tmp_path / "net.onnx", *LAYER_VARIANTS[variant]))
    assert_matches_onnxruntime(network, random_inputs(network))
    if variant not in ENGINE_REFUSES:
        TracedNetwork(network.module, network.input_shape)


# Found by review and fixed: each failed before its fix.

def test_gemm_with_a_row_bias_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng(7)
    path = save_model(tmp_path / "net.onnx", single("Gemm", ["w", "c"], transB=1),
                      {"w": weights(rng, 3, 5), "c": weights(rng, 1, 3)}, [1, 5], [1, 3])
    network = load_onnx(path)
    assert_matches_onnxruntime(network, random_inputs(network))


def test_flatten_with_a_negative_axis_matches_onnxruntime(tmp_path):
    path = save_model(tmp_path / "net.onnx", single("Flatten", [], axis=-3), {},
                      [1, 2, 3, 3], [1, 18])
    network = load_onnx(path)
    assert_matches_onnxruntime(network, random_inputs(network))


def test_shape_arithmetic_of_opset_11_is_folded(tmp_path):
    node = helper.make_node
    nodes = [node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "zero"], ["batch"]),
             node("Unsqueeze", ["batch"], ["batch1"], axes=[0]),
             node("Concat", ["batch1", "minus_one"], ["target"], axis=0),
             node("Reshape", ["x", "target"], ["y"])]
    path = save_model(tmp_path / "net.onnx", nodes,
                      {"zero": np.array(0, np.int64), "minus_one": ints(-1)},
                      [1, 2, 3, 3], [1, 18], opset=11)
    network = load_onnx(path)
    assert_matches_onnxruntime(network, random_inputs(network))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
def test_constant_first_arithmetic_is_accepted_by_the_engine(tmp_path, op: str):
    path = tmp_path / "net.onnx"
    save_model(path, [helper.make_node(op, ["c", "x"], ["y"])],
               {"c": weights(np.random.default_rng(8), 3)}, [1, 3], [1, 3])
    network = load_onnx(path)
    assert_matches_onnxruntime(network, random_inputs(network))
    TracedNetwork(network.module, network.input_shape)


# -- errors ----------------------------------------------------------------------------

def test_truncated_file_is_a_one_line_user_error(tmp_path):
    data = cnn(tmp_path / "whole.onnx").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    assert "not a valid ONNX model" in assert_one_line_error(info.value, path)


def test_missing_file_is_a_one_line_user_error(tmp_path):
    path = tmp_path / "absent.onnx"
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    assert "not found" in assert_one_line_error(info.value, path)


@pytest.mark.parametrize("content", [b"input,output\n0.5,1\n", b"", b"\x1f\x8b\x08garbage"])
def test_file_that_is_not_onnx_is_a_one_line_user_error(tmp_path, content: bytes):
    path = tmp_path / "table.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    assert_one_line_error(info.value, path)


def test_corrupt_gzip_file_is_a_one_line_user_error(tmp_path):
    path = tmp_path / "net.onnx.gz"
    path.write_bytes(gzip.compress(cnn(tmp_path / "net.onnx").read_bytes())[:500])
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    assert "gzip" in assert_one_line_error(info.value, path)


@pytest.mark.parametrize("op, attributes", [("Softmax", {"axis": 1}), ("Sin", {})])
def test_unsupported_operation_is_named(tmp_path, op: str, attributes: dict):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"]),
             helper.make_node(op, ["g"], ["y"], name="head", **attributes)]
    path = save_model(tmp_path / "net.onnx", nodes,
                      {"w": weights(np.random.default_rng(9), 4, 3)}, [1, 4], [1, 3])
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    assert isinstance(info.value, UnsupportedLayerError)
    assert f"'{op}'" in assert_one_line_error(info.value, path)


def test_conv_with_asymmetric_pads_is_refused(tmp_path):
    path = save_model(tmp_path / "net.onnx", single("Conv", ["w"], pads=[0, 0, 1, 1]),
                      {"w": weights(np.random.default_rng(10), 2, 1, 3, 3)},
                      [1, 1, 6, 6], [1, 2, 5, 5])
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    message = assert_one_line_error(info.value, path)
    assert "'Conv'" in message and "asymmetric" in message


def test_product_of_two_input_dependent_tensors_is_refused(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["x", "r"], ["y"])]
    path = save_model(tmp_path / "net.onnx", nodes, {}, [1, 3], [1, 3])
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    assert isinstance(info.value, UnsupportedLayerError)
    assert "'Mul'" in assert_one_line_error(info.value, path)


@pytest.mark.parametrize("name", ["net.onnx.gz", "net.onnx"])
def test_gzip_file_is_read_transparently(tmp_path, name: str):
    """``net.onnx.gz`` by its name, and by ``net.onnx`` when only the ``.gz`` exists."""
    plain = residual(tmp_path / "plain.onnx")
    folder = tmp_path / "gz"
    folder.mkdir()
    (folder / "net.onnx.gz").write_bytes(gzip.compress(plain.read_bytes()))
    network, reference = load_onnx(folder / name), load_onnx(plain)
    x = random_inputs(network)
    assert_matches_onnxruntime(network, x)
    with torch.no_grad():
        torch.testing.assert_close(network.module(x), reference.module(x), rtol=0, atol=0)


# -- as_classifier -----------------------------------------------------------------------

def small_cnn(path: Path) -> Path:
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1)]
    return save_model(path, nodes, {"w": weights(rng, 2, 3, 3, 3), "wg": weights(rng, 5, 32)},
                      [1, 3, 4, 4], [1, 5])


def dense_64(path: Path) -> Path:
    rng = np.random.default_rng(12)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    return save_model(path, nodes, {"w": weights(rng, 16, 64, scale=0.2),
                                    "b": weights(rng, 16), "w2": weights(rng, 10, 16)},
                      [1, 64], [1, 10])


@pytest.mark.parametrize("mean, std", [([0.1, 0.2, 0.3], [0.5, 0.25, 2.0]), ([0.4], [0.3])])
def test_classifier_normalises_before_the_network(tmp_path, mean: list, std: list):
    network = load_onnx(small_cnn(tmp_path / "net.onnx"))
    classifier = as_classifier(network, (3, 4, 4), 5, mean, std)
    x = random_inputs(network)
    normalised = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        ours = classifier(x).double().numpy()
    np.testing.assert_allclose(ours, OnnxRuntime(network)(normalised), rtol=0, atol=TOL)


def test_classifier_reshapes_images_for_a_network_of_vectors(tmp_path):
    network = load_onnx(dense_64(tmp_path / "net.onnx"))
    assert network.input_shape == (64,)
    classifier = as_classifier(network, (1, 8, 8), 10, [0.3], [0.4])
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = classifier(x).double().numpy()
    theirs = OnnxRuntime(network)(((x - 0.3) / 0.4).reshape(8, 64))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)
    TracedNetwork(classifier, (1, 8, 8))


@pytest.mark.parametrize("shape, classes, mean, std, words", [
    ((1, 7, 7), 10, None, None, "takes inputs of shape"),
    ((1, 8, 8), 9, None, None, "10 outputs"),
    ((1, 8, 8), 10, [0.1, 0.2], [0.3, 0.3], "normalization"),
    ((1, 8, 8), 10, [0.1], [0.3, 0.3], "normalization"),
])
def test_classifier_of_mismatched_sizes_is_refused(tmp_path, shape, classes, mean, std, words):
    path = dense_64(tmp_path / "net.onnx")
    with pytest.raises(OnnxImportError) as info:
        as_classifier(load_onnx(path), shape, classes, mean, std)
    assert words in assert_one_line_error(info.value, path)


def test_symbolic_size_after_the_batch_is_a_one_line_user_error(tmp_path):
    path = save_model(tmp_path / "net.onnx", single("Relu", []), {}, ["N", 3, "H"],
                      ["N", 3, "H"])
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    assert "symbolic size" in assert_one_line_error(info.value, path)


def test_symbolic_batch_size_is_accepted(tmp_path):
    path = save_model(tmp_path / "net.onnx", single("Relu", []), {}, ["N", 4], ["N", 4])
    network = load_onnx(path)
    assert network.input_shape == (4,)
    assert_matches_onnxruntime(network, random_inputs(network))


def test_a_directory_is_not_an_onnx_file(tmp_path):
    with pytest.raises(OnnxImportError, match="not found"):
        load_onnx(tmp_path)
