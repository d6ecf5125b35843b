"""The CUDA path against the CPU: every verifier family on the same model and points on
both devices, the harness's GPU measurements, ONNX networks against onnxruntime, and
`certbench vnncomp` on the GPU. Marked ``cuda``; skipped where no GPU is present.

``CERTBENCH_TEST_DEVICE`` names the device compared with the CPU (default ``cuda``);
``scripts/gpu_run.py --dry-run`` sets it to ``cpu`` so that these tests run, CPU against
CPU, on a machine without a GPU before the device time is spent.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from certbench.io.onnx_import import OnnxRuntime, load_onnx
from certbench.matrix import parse_matrix
from certbench.models import build_model
from certbench.run.executors import InlineExecutor
from certbench.run.runner import run_matrix
from certbench.verifiers import get_verifier
from certbench.vnncomp.pipeline import run_vnncomp
from conftest import DIGITS_SHAPE, SHARED_DATA

DEVICE = torch.device(os.environ.get("CERTBENCH_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device here (set CERTBENCH_TEST_DEVICE=cpu for a dry "
                       "run of these tests on the CPU)"),
]
MNISTFC = SHARED_DATA / "vnncomp2021" / "mnistfc" / "mnist-net_256x2.onnx"
TEST_SUITE = SHARED_DATA / "vnncomp2021" / "test"


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"mlp": build_model("mlp", DIGITS_SHAPE, 10, (0.3,), (0.4,),
                               {"widths": [32, 32]}).eval(),
            "cnn-small": build_model("cnn-small", DIGITS_SHAPE, 10, (0.3,), (0.4,)).eval()}


def _certify(name: str, model: nn.Module, x: torch.Tensor, device: torch.device, norm: str,
             eps: list[float], **options):
    verifier = get_verifier(name, **options)
    model = model.to(device)
    verifier.prepare(model, DIGITS_SHAPE)
    return verifier.certify(x.to(device), norm, eps)


@pytest.fixture(scope="module")
def points(digits):
    return digits.x_test[:16], digits.y_test[:16]


@pytest.mark.parametrize("arch", ["mlp", "cnn-small"])
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_linear_relaxation_bounds_equal_on_both_devices(points, arch, method):
    x, _ = points
    model = _models()[arch]
    on_cpu = _certify(method, model, x, torch.device("cpu"), "inf", [0.01, 0.03])
    on_device = _certify(method, model, x, DEVICE, "inf", [0.01, 0.03])
    assert torch.equal(on_cpu.prediction.cpu(), on_device.prediction.cpu())
    torch.testing.assert_close(on_device.columns["margin_lb"].cpu().double(),
                               on_cpu.columns["margin_lb"].cpu().double(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,options", [("global-lipschitz", {"bound": "gloro"}),
                                          ("global-lipschitz", {"bound": "lmt"}),
                                          ("local-lipschitz", {})])
def test_lipschitz_constants_equal_on_both_devices(points, name, options):
    x, _ = points
    model = _models()["cnn-small"]
    on_cpu = _certify(name, model, x, torch.device("cpu"), "2", [0.1, 0.3], **options)
    on_device = _certify(name, model, x, DEVICE, "2", [0.1, 0.3], **options)
    torch.testing.assert_close(on_device.columns["lipschitz_bound"].cpu().double(),
                               on_cpu.columns["lipschitz_bound"].cpu().double(),
                               rtol=1e-4, atol=1e-6)
    assert torch.equal(on_cpu.verdicts.cpu(), on_device.verdicts.cpu())


def test_smoothing_counts_agree_in_distribution(points, trained):
    """Different generators on the two devices: the top class counts are two binomial
    draws of the same p_A, so they may differ by a few standard deviations, no more."""
    x, _ = points
    model = trained["mlp-noise"]
    n = 2000
    on_cpu = _certify("smoothing", model, x, torch.device("cpu"), "2", [0.1], sigma=0.25,
                      n=n, n0=100)
    on_device = _certify("smoothing", model, x, DEVICE, "2", [0.1], sigma=0.25, n=n, n0=100)
    same = on_cpu.prediction.cpu() == on_device.prediction.cpu()
    assert same.float().mean() >= 0.85
    a, b = on_cpu.columns["count_a"].double()[same], on_device.columns["count_a"].double()[same]
    p = ((a + b) / (2 * n)).clamp(1e-3, 1 - 1e-3)
    z = (a - b).abs() / torch.sqrt(2 * n * p * (1 - p))
    assert (z < 5).all(), z


@pytest.mark.parametrize("name", ["bab", "exact"])
def test_complete_verdicts_equal_on_both_devices(points, name):
    x, _ = points
    torch.manual_seed(1)
    model = build_model("mlp", DIGITS_SHAPE, 10, (0.3,), (0.4,), {"widths": [16]}).eval()
    options = {"time_limit_s": 20.0} if name == "bab" else {}
    on_cpu = _certify(name, model, x[:6], torch.device("cpu"), "inf", [0.01, 0.05], **options)
    on_device = _certify(name, model, x[:6], DEVICE, "inf", [0.01, 0.05], **options)
    assert torch.equal(on_cpu.verdicts.cpu(), on_device.verdicts.cpu())


@pytest.mark.skipif(not MNISTFC.exists(), reason=f"{MNISTFC} not found")
def test_onnx_network_on_the_device_matches_onnxruntime():
    network = load_onnx(MNISTFC)
    runtime = OnnxRuntime(network)
    x = torch.rand(8, *network.input_shape, generator=torch.Generator().manual_seed(0))
    expected = np.concatenate([runtime(x[i : i + 1].numpy()) for i in range(len(x))])
    with torch.no_grad():
        got = network.module.to(DEVICE)(x.to(DEVICE)).cpu().numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_harness_measures_the_device(tmp_path):
    """A matrix on the device: every cell ok, memory of the device's kind and > 0,
    provenance naming the GPU where there is one."""
    spec = parse_matrix({
        "name": "device", "dataset": "digits", "samples": 12, "norms": ["inf"],
        "eps": [0.02], "device": str(DEVICE), "attack": {"steps": 5, "restarts": 1},
        "models": [{"name": "m", "arch": "mlp", "arch_args": {"widths": [16]},
                    "recipe_args": {"epochs": 1}}],
        "verifiers": [{"name": "crown"}, {"name": "global-lipschitz"},
                      {"name": "smoothing", "options": {"n": 500, "n0": 50}}],
    })
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False,
                       log=lambda _: None, executor=InlineExecutor())
    assert (cells["status"] == "ok").all(), cells["error"].tolist()
    assert (cells["device"] == str(DEVICE)).all()
    assert set(cells["mem_kind"]) == {"cuda" if DEVICE.type == "cuda" else "rss"}
    assert (cells["peak_mem_bytes"] > 0).all()
    if DEVICE.type == "cuda":
        assert "gpu" in pd.Series(cells["versions"]).iloc[0]


@pytest.mark.skipif(not TEST_SUITE.exists(), reason=f"{TEST_SUITE} not found")
def test_vnncomp_answers_equal_on_both_devices(tmp_path):
    csv = TEST_SUITE / "test_instances.csv"
    answers = []
    for side, device in enumerate(("cpu", str(DEVICE))):
        rows = run_vnncomp(csv, tmp_path / str(side), [("crown", {}), ("bab", {})],
                           progress=False, executor=InlineExecutor(), device=device)
        assert (rows["result"] != "error").all(), rows["error"].tolist()
        assert {torch.device(d).type for d in rows["device"]} == {torch.device(device).type}
        answers.append(rows.set_index(["instance", "method"])["result"].sort_index())
    assert answers[0].equals(answers[1])
