"""`certbench vnncomp`: answers on instances whose truth is known, counterexamples confirmed
by onnxruntime, the competition's files, resume, timeouts, errors and bad input."""

from __future__ import annotations

import itertools
import re
import shutil

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from certbench.cli import main
from certbench.io.onnx_import import OnnxRuntime, load_onnx
from certbench.run.executors import ProcessExecutor
from certbench.store import ResultsStore
from certbench.vnncomp.pipeline import run_vnncomp
from conftest import SHARED_DATA

TEST_SUITE = SHARED_DATA / "vnncomp2021" / "test"
needs_suite = pytest.mark.skipif(not TEST_SUITE.exists(),
                                 reason=f"VNN-COMP 2021 test suite not found at {TEST_SUITE}")


def mlp_onnx(path, layers: list[np.ndarray], activation: str = "Relu") -> None:
    """An ONNX MLP: Gemm (weights (out, in), transB) + activation, the last Gemm bare;
    biases are the layers' last column."""
    nodes, inits, current = [], [], "x"
    for i, layer in enumerate(layers):
        w, b = layer[:, :-1].astype(np.float32), layer[:, -1].astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
        current = f"g{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node(activation, [current], [f"a{i}"]))
            current = f"a{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, layers[0].shape[1] - 1])
    y = helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, layers[-1].shape[0]])
    graph = helper.make_graph(nodes, "mlp", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def robustness_vnnlib(lower, upper, label: int, classes: int) -> str:
    """The competition's robustness property: unsafe if some other class scores >= label."""
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lower))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(classes)]
    for i, (lo, hi) in enumerate(zip(lower, upper, strict=True)):
        lines += [f"(assert (>= X_{i} {float(lo)!r}))", f"(assert (<= X_{i} {float(hi)!r}))"]
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(classes) if j != label)
    lines.append(f"(assert (or {others}))")
    return "\n".join(lines) + "\n"


def parse_counterexample(text: str) -> tuple[str, np.ndarray]:
    head, _, body = text.partition("\n")
    values = re.findall(r"\(X_(\d+) ([^)\s]+)\)", body)
    return head, np.array([float(v) for _, v in sorted(values, key=lambda p: int(p[0]))])


def results_rows(folder) -> dict[tuple[str, str], str]:
    table = ResultsStore(folder).read("instances")
    return {(r.instance, r.verifier): r.result for r in table.itertuples()}


@needs_suite
def test_vnncomp_2021_test_instances_answered_as_their_names_say(tmp_path):
    """test_sat is sat, test_unsat and the tiny networks hold (unsat); every sat's
    counterexample file is read back and confirmed with onnxruntime."""
    code = main(["vnncomp", str(TEST_SUITE / "test_instances.csv"), "--results",
                 str(tmp_path), "--verifiers", "crown", "exact", "--quiet"])
    assert code == 0
    rows = results_rows(tmp_path)
    for (instance, verifier), result in rows.items():
        expected = "sat" if instance.startswith("test_sat") else "unsat"
        assert result == expected, (instance, verifier)
    for verifier in ("crown", "exact"):
        text = (tmp_path / "vnncomp" / verifier / "test" / "test_sat__test_prop.txt").read_text()
        head, x = parse_counterexample(text)
        assert head == "sat"
        network = load_onnx(TEST_SUITE / "test_sat.onnx")
        y = OnnxRuntime(network)(x[None].reshape(1, *network.input_shape))[0]
        assert (y[0] <= y[1:]).all()  # test_prop's unsafe set: Y_0 is the smallest
        csv = (tmp_path / "vnncomp" / verifier / "results.csv").read_text().splitlines()
        assert len(csv) == 5 and all(line.startswith("test,") for line in csv)


def _planted(tmp_path, seed=0):
    """A random 2-16-16-3 ReLU network whose first-layer hyperplanes pass through the
    centre of [0, 1]^2, so that decision boundaries cross the unit square."""
    rng = np.random.default_rng(seed)
    layers = [rng.normal(size=(16, 3)) * 4, rng.normal(size=(16, 17)),
              rng.normal(size=(3, 17))]
    layers[0][:, -1] = -layers[0][:, :-1].sum(1) / 2
    mlp_onnx(tmp_path / "net.onnx", layers)
    return load_onnx(tmp_path / "net.onnx")


def _grid_violates(network, lower, upper, label, n=201) -> bool:
    """Whether a dense grid of the 2-D box reaches the unsafe set."""
    axes = [np.linspace(lo, hi, n) for lo, hi in zip(lower, upper, strict=True)]
    points = torch.tensor(list(itertools.product(*axes)), dtype=torch.float32)
    with torch.no_grad():
        y = network.module(points)
    others = torch.cat([y[:, :label], y[:, label + 1:]], dim=1)
    return bool((others >= y[:, label : label + 1]).any())


def _boundary_distance(network, center, label, n=401) -> float:
    """l_inf distance from center to the nearest grid point of [0, 1]^2 labelled otherwise."""
    axis = np.linspace(0, 1, n)
    points = torch.tensor(list(itertools.product(axis, axis)), dtype=torch.float32)
    with torch.no_grad():
        other = network.module(points).argmax(1) != label
    return float((points[other] - torch.tensor(center)).abs().amax(1).min())


def test_planted_network_answers_agree_with_a_dense_grid(tmp_path):
    """Both ways, on boxes from well inside to well past the decision boundary: where the
    grid reaches the unsafe set exact answers sat, with a counterexample that onnxruntime
    confirms inside the box; where exact answers unsat the grid finds nothing; the unsat
    of every bound method (ibp, crown-ibp, crown, alpha-crown) implies exact's. The
    attack is off, so every sat comes from the verifier. bab, complete too, answers
    what exact answers on every box (by input splitting: with ReLU splits alone the box
    at 0.9 of the boundary distance needed ~1.7e5 domains, about 3 minutes on a slow
    2-core machine)."""
    network = _planted(tmp_path)
    center = np.array([0.5, 0.5])
    label = int(network.module(torch.tensor(center[None], dtype=torch.float32)).argmax())
    distance = _boundary_distance(network, center, label)
    radii = [distance * f for f in (0.2, 0.5, 0.9, 1.2, 2.0)]
    lines = []
    for k, radius in enumerate(radii):
        lower, upper = center - radius, center + radius
        (tmp_path / f"p{k}.vnnlib").write_text(robustness_vnnlib(lower, upper, label, 3))
        lines.append(f"net.onnx,p{k}.vnnlib,20")
    (tmp_path / "instances.csv").write_text("\n".join(lines) + "\n")
    bounds = [("ibp", {}), ("crown-ibp", {}), ("crown", {}), ("alpha-crown", {})]
    run_vnncomp(tmp_path / "instances.csv", tmp_path / "out",
                [*bounds, ("exact", {}), ("bab", {})],
                attack={"enabled": False}, progress=False)
    rows = results_rows(tmp_path / "out")
    seen = set()
    for k, radius in enumerate(radii):
        truth = _grid_violates(network, center - radius, center + radius, label)
        exact = rows[f"net__p{k}", "exact"]
        seen.add(exact)
        assert exact in ("sat", "unsat"), radius
        assert rows[f"net__p{k}", "bab"] == exact, radius
        if truth:
            assert exact == "sat", radius
        for name, _ in bounds:  # a bound method's unsat is a proof: exact must agree
            assert rows[f"net__p{k}", name] in ("unsat", "unknown"), (name, radius)
            if rows[f"net__p{k}", name] == "unsat":
                assert exact == "unsat", (name, radius)
        if exact == "sat":
            head, x = parse_counterexample(
                (tmp_path / "out" / "vnncomp" / "exact" / tmp_path.name / f"net__p{k}.txt"
                 ).read_text())
            y = OnnxRuntime(network)(x[None])[0]
            assert (np.delete(y, label) >= y[label]).any()
            assert (x >= center - radius).all() and (x <= center + radius).all()
    assert seen == {"sat", "unsat"}  # the planted boxes cover both answers


def test_rerun_skips_answered_instances_and_timeouts_are_kept_apart(tmp_path):
    network = _planted(tmp_path, seed=1)
    del network
    (tmp_path / "p.vnnlib").write_text(robustness_vnnlib([0.4, 0.4], [0.6, 0.6], 0, 3))
    (tmp_path / "instances.csv").write_text("net.onnx,p.vnnlib,60\n")
    first = run_vnncomp(tmp_path / "instances.csv", tmp_path / "out", [("crown", {})],
                        progress=False)
    assert len(first) == 1
    again = run_vnncomp(tmp_path / "instances.csv", tmp_path / "out", [("crown", {})],
                        progress=False)
    assert again.empty
    rows = run_vnncomp(tmp_path / "instances.csv", tmp_path / "out", [("crown", {})],
                       timeout_scale=1e-9, progress=False)
    assert rows["result"].tolist() == ["timeout"]
    # another timeout is another instance key
    assert len(ResultsStore(tmp_path / "out").read("instances")) == 2


def test_a_verifier_that_cannot_take_the_network_is_an_error_row(tmp_path):
    """exact has no MILP for sigmoid: its rows say error with the reason; crown answers."""
    rng = np.random.default_rng(0)
    mlp_onnx(tmp_path / "net.onnx", [rng.normal(size=(8, 3)), rng.normal(size=(3, 9))],
             activation="Sigmoid")
    (tmp_path / "p.vnnlib").write_text(robustness_vnnlib([0.4, 0.4], [0.41, 0.41], 0, 3))
    (tmp_path / "instances.csv").write_text("net.onnx,p.vnnlib,60\n")
    run_vnncomp(tmp_path / "instances.csv", tmp_path / "out", [("exact", {}), ("crown", {})],
                progress=False)
    table = ResultsStore(tmp_path / "out").read("instances").set_index("verifier")
    assert table.loc["exact", "result"] == "error"
    assert "Sigmoid" in table.loc["exact", "error"]
    assert table.loc["crown", "result"] in ("unsat", "sat", "unknown")


@pytest.fixture
def answered(tmp_path):
    """A results folder with one answered instance, and the instance's files."""
    rng = np.random.default_rng(0)
    mlp_onnx(tmp_path / "net.onnx", [rng.normal(size=(8, 3)), rng.normal(size=(3, 9))])
    (tmp_path / "p.vnnlib").write_text(robustness_vnnlib([0.4, 0.4], [0.41, 0.41], 0, 3))
    (tmp_path / "instances.csv").write_text("net.onnx,p.vnnlib,60\n")
    assert main(["vnncomp", str(tmp_path / "instances.csv"), "--results",
                 str(tmp_path / "out"), "--verifiers", "crown", "--quiet"]) == 0
    return tmp_path


def _bad_softmax_onnx(path) -> None:
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
         helper.make_node("Softmax", ["g"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


BAD_INPUTS = {
    "malformed vnnlib": ("p.vnnlib", lambda d: (d / "p.vnnlib").write_text(
        "(declare-const X_0 Real)\n(assert (<= X_0 0.5)\n"), "p.vnnlib"),
    "vnnlib for another input size": ("p.vnnlib", lambda d: (d / "p.vnnlib").write_text(
        robustness_vnnlib([0.1] * 5, [0.2] * 5, 0, 3)), "5 inputs"),
    "unsupported onnx operation": ("net.onnx", lambda d: _bad_softmax_onnx(d / "net.onnx"),
                                   "Softmax"),
    "missing file": ("net.onnx", lambda d: (d / "net.onnx").unlink(), "not found"),
    "truncated onnx": ("net.onnx", lambda d: (d / "net.onnx").write_bytes(
        (d / "net.onnx").read_bytes()[:100]), "net.onnx"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_is_overwritten(answered, case, capsys):
    _, spoil, expected = BAD_INPUTS[case]
    before = {p: p.read_bytes() for p in (answered / "out").rglob("*") if p.is_file()}
    spoil(answered)
    capsys.readouterr()
    code = main(["vnncomp", str(answered / "instances.csv"), "--results",
                 str(answered / "out"), "--verifiers", "crown", "--quiet", "--force"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("certbench: error:")
    assert expected in err
    after = {p: p.read_bytes() for p in (answered / "out").rglob("*") if p.is_file()}
    assert after == before


def test_verifier_without_check_spec_is_refused(answered, capsys):
    code = main(["vnncomp", str(answered / "instances.csv"), "--results",
                 str(answered / "out2"), "--verifiers", "smoothing", "--quiet"])
    assert code == 2
    assert "cannot check VNN-LIB" in capsys.readouterr().err


def test_show_and_report_have_the_vnncomp_section(answered, capsys):
    assert main(["show", str(answered / "out")]) == 0
    shown = capsys.readouterr().out
    assert "VNN-COMP instances" in shown and "crown" in shown
    assert main(["report", str(answered / "out"), "--out", str(answered / "report")]) == 0
    md = (answered / "report" / "report.md").read_text()
    assert "## VNN-COMP instances" in md and "figures/cactus.png" in md
    assert (answered / "report" / "figures" / "cactus.png").stat().st_size > 1000
    table = pd.read_parquet(answered / "out" / "instances.parquet")
    assert {"overhead_s", "time_s", "attack_s", "result", "instance_key"} <= set(table.columns)


@needs_suite
def test_gz_instances_are_found_by_names_without_gz(tmp_path):
    """VNN-COMP 2022 lists `x.onnx` for `x.onnx.gz`; a copy of the test suite, gzipped."""
    import gzip

    for name in ("test_tiny.onnx", "test_tiny.vnnlib"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((TEST_SUITE / name).read_bytes()))
    shutil.copy(TEST_SUITE / "test_instances.csv", tmp_path / "all.csv")
    (tmp_path / "instances.csv").write_text("test_tiny.onnx,test_tiny.vnnlib,60\n")
    rows = run_vnncomp(tmp_path / "instances.csv", tmp_path / "out", [("crown", {})],
                       progress=False)
    assert rows["result"].tolist() == ["unsat"]


def test_hanging_crashing_and_memory_hungry_verifiers_each_cost_one_instance(tmp_path):
    """Planted faults in check_spec under the default process executor: the hang is
    stopped at the budget plus the overhead allowance (timeout), the crash is an error
    naming its signal, the runaway allocation is oom; crown answers the same instance, and
    a rerun would retry the error and oom rows only."""
    rng = np.random.default_rng(0)
    mlp_onnx(tmp_path / "net.onnx", [rng.normal(size=(8, 3)), rng.normal(size=(3, 9))])
    (tmp_path / "p.vnnlib").write_text(robustness_vnnlib([0.4, 0.4], [0.41, 0.41], 0, 3))
    (tmp_path / "instances.csv").write_text("net.onnx,p.vnnlib,2\n")
    verifiers = [("test-spec-hang", {}), ("test-spec-crash", {}), ("test-spec-hog", {}),
                 ("crown", {})]
    executor = ProcessExecutor(workers=2, memory_limit_bytes=768 * 2**20)
    rows = run_vnncomp(tmp_path / "instances.csv", tmp_path / "out", verifiers,
                       progress=False, executor=executor, overhead_s=3.0,
                       imports=("plugin_verifiers",), attack={"enabled": False})
    table = rows.set_index("verifier")
    assert table.loc["test-spec-hang", "result"] == "timeout"
    assert "limit of 5 s" in table.loc["test-spec-hang", "error"]
    assert table.loc["test-spec-hang", "time_s"] < 5 + 2  # killed at its limit, polled
    assert table.loc["test-spec-crash", "result"] == "error"
    assert "SIGSEGV" in table.loc["test-spec-crash", "error"]
    assert table.loc["test-spec-hog", "result"] == "oom"
    assert table.loc["crown", "result"] in ("unsat", "sat", "unknown")
    text = (tmp_path / "out" / "vnncomp" / "test-spec-hog" / "results.csv").read_text()
    assert text.strip().split(",")[4] == "error"  # the competition's files have no oom
    done = ResultsStore(tmp_path / "out").done_instances()
    assert done == set(table.loc[["test-spec-hang", "crown"], "instance_key"])


BAD_OPTIONS = {
    "unknown verifier": (["--verifiers", "crwn"], "unknown verifier 'crwn'"),
    "names with a comma": (["--verifiers", "crown,bab"], "separate names with spaces"),
    "bad verifier option": (["--verifiers", 'crown:{"alpha_steps": 3}'], "options"),
    "no memory": (["--memory-limit-gb", "0"], "--memory-limit-gb must be positive"),
    "missing plugin": (["--import", "no_such_plugin_mod"], "no_such_plugin_mod"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_a_mistaken_option_is_one_line_exit_2(answered, case, capsys):
    extra, expected = BAD_OPTIONS[case]
    args = ["vnncomp", str(answered / "instances.csv"), "--results", str(answered / "out"),
            "--quiet", *extra]
    if "--verifiers" not in extra:
        args += ["--verifiers", "crown"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("certbench: error:"), err
    assert expected in err


def test_a_corrupted_instances_table_is_one_line_exit_2(answered, capsys):
    (answered / "out" / "instances.parquet").write_bytes(b"not parquet")
    capsys.readouterr()
    for args in (["show", str(answered / "out")],
                 ["vnncomp", str(answered / "instances.csv"), "--results",
                  str(answered / "out"), "--verifiers", "crown", "--quiet"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a readable Parquet table" in err


def test_a_network_without_a_conversion_costs_its_instances_only(tmp_path):
    """One of two networks uses Softmax: its instance is an error row naming the
    operation, the other network's instance is answered."""
    rng = np.random.default_rng(0)
    mlp_onnx(tmp_path / "net.onnx", [rng.normal(size=(8, 3)), rng.normal(size=(3, 9))])
    _bad_softmax_onnx(tmp_path / "bad.onnx")
    (tmp_path / "p.vnnlib").write_text(robustness_vnnlib([0.4, 0.4], [0.41, 0.41], 0, 3))
    (tmp_path / "instances.csv").write_text("net.onnx,p.vnnlib,30\nbad.onnx,p.vnnlib,30\n")
    rows = run_vnncomp(tmp_path / "instances.csv", tmp_path / "out", [("crown", {})],
                       progress=False).set_index("instance")
    assert rows.loc["bad__p", "result"] == "error"
    assert "Softmax" in rows.loc["bad__p", "error"]
    assert rows.loc["net__p", "result"] in ("unsat", "sat", "unknown")
