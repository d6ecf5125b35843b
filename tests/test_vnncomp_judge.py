"""Counterexamples judged as VNN-COMP 2022 judged them (`vnncomp.judge`): degenerate boxes
whose fixed values float32 cannot hold, the tolerance on the unsafe set, the strict
column beside it, and a sat that meets an unsat reported as a soundness conflict."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_vnncomp import _planted, mlp_onnx, robustness_vnnlib

from certbench.cli import main
from certbench.io.onnx_import import OnnxRuntime, load_onnx
from certbench.io.vnnlib import Region, read_vnnlib
from certbench.report.build import build_report
from certbench.store import ResultsStore
from certbench.vnncomp.judge import COUNTEREXAMPLE_TOL, float32_point, judge
from certbench.vnncomp.pipeline import run_vnncomp

FIXED = [1.40240924, 0.1, 2.718281828459045, -0.3]  # none of them is a float32 value


def test_float32_point_is_inside_where_a_float32_value_is_and_nearest_otherwise():
    lower = np.array([FIXED[0], 0.1, 0.0])
    upper = np.array([FIXED[0], 0.1 + 1e-7, 1.0])
    x = float32_point(np.array([5.0, 0.1, 0.5]), lower, upper)
    assert x.dtype == np.float32
    assert float(x[0]) != FIXED[0] and abs(float(x[0]) - FIXED[0]) <= np.spacing(np.float32(x[0]))
    assert lower[1] <= x[1] <= upper[1]  # 0.1 rounds below the box; one ulp up is inside
    assert x[2] == np.float32(0.5)


def _band_vnnlib(lower, upper, low: float, high: float) -> str:
    """Unsafe: low <= Y_0 <= high (a band, the shape of collins_rul_cnn's properties)."""
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lower))] + [
        "(declare-const Y_0 Real)"]
    for i, (lo, hi) in enumerate(zip(lower, upper, strict=True)):
        lines += [f"(assert (>= X_{i} {float(lo)!r}))", f"(assert (<= X_{i} {float(hi)!r}))"]
    lines += [f"(assert (>= Y_0 {float(low)!r}))", f"(assert (<= Y_0 {float(high)!r}))"]
    return "\n".join(lines) + "\n"


def competition_accepts(text: str, onnx_path, vnnlib_path, tol=COUNTEREXAMPLE_TOL) -> bool:
    """The competition's check, written apart from certbench's: the file's X run by
    onnxruntime within tol of its Y, X in a box widened by tol, Y in the unsafe set
    widened by tol."""
    values = dict(re.findall(r"\(([XY]_\d+) ([^)\s]+)\)", text))
    x = np.array([float(values[f"X_{i}"]) for i in range(sum(k[0] == "X" for k in values))])
    y = np.array([float(values[f"Y_{j}"]) for j in range(sum(k[0] == "Y" for k in values))])
    network = load_onnx(onnx_path)
    ran = OnnxRuntime(network)(x.astype(np.float32).reshape(1, *network.input_shape))[0]
    if np.abs(ran - y).max() > tol:
        return False
    for region in read_vnnlib(vnnlib_path).regions:
        if ((x >= region.lower - tol) & (x <= region.upper + tol)).all() and any(
                (c @ y <= d + tol).all() for c, d in region.constraints):
            return True
    return False


@pytest.fixture
def degenerate(tmp_path):
    """A 5-8-1 ReLU network on a box with four inputs fixed at values float32 cannot hold
    and one free in [0, 1]; a band around the output at the box's centre (sat) and one far
    above every output the box reaches (unsat), and the same two bands on a box that
    frees every input (where a float32 point of the box exists)."""
    rng = np.random.default_rng(3)
    mlp_onnx(tmp_path / "net.onnx", [rng.normal(size=(8, 6)), rng.normal(size=(1, 9))])
    network = load_onnx(tmp_path / "net.onnx")
    fixed_lower = np.array([*FIXED, 0.0])
    fixed_upper = np.array([*FIXED, 1.0])
    centre = OnnxRuntime(network)(((fixed_lower + fixed_upper) / 2)[None])[0, 0]
    free_lower, free_upper = fixed_lower - 0.05, fixed_upper + 0.05
    lines = []
    for name, (lo, hi) in {"fixed": (fixed_lower, fixed_upper),
                           "free": (free_lower, free_upper)}.items():
        for kind, band in {"sat": (centre - 0.01, centre + 0.01),
                           "unsat": (centre + 1e3, centre + 2e3)}.items():
            (tmp_path / f"{name}_{kind}.vnnlib").write_text(_band_vnnlib(lo, hi, *band))
            lines.append(f"net.onnx,{name}_{kind}.vnnlib,30")
    (tmp_path / "instances.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_degenerate_box_is_sat_by_the_competitions_rule_and_strict_says_no(degenerate):
    rows = run_vnncomp(degenerate / "instances.csv", degenerate / "out", [("crown", {})],
                       progress=False).set_index("instance")
    assert rows.loc["net__fixed_sat", "result"] == "sat"
    assert rows.loc["net__fixed_sat", "counterexample_accepted"]
    assert not rows.loc["net__fixed_sat", "confirmed_strict"]  # no float32 point in the box
    assert rows.loc["net__free_sat", "result"] == "sat"
    assert rows.loc["net__free_sat", "confirmed_strict"]
    for name in ("fixed", "free"):
        assert rows.loc[f"net__{name}_unsat", "result"] == "unsat"
        text = (degenerate / "out" / "vnncomp" / "crown" / degenerate.name /
                f"net__{name}_sat.txt").read_text()
        assert text.startswith("sat\n")
        assert competition_accepts(text, degenerate / "net.onnx",
                                   degenerate / f"{name}_sat.vnnlib")


def test_the_unsafe_set_is_widened_by_the_tolerance_and_no_more(tmp_path):
    rng = np.random.default_rng(4)
    mlp_onnx(tmp_path / "net.onnx", [rng.normal(size=(8, 3)), rng.normal(size=(2, 9))])
    runtime = OnnxRuntime(load_onnx(tmp_path / "net.onnx"))
    point = np.array([0.25, 0.75])
    y0 = runtime(point.astype(np.float32)[None])[0, 0]
    box = (np.zeros(2), np.ones(2))
    row = np.array([[-1.0, 0.0]])  # unsafe: -Y_0 <= d, i.e. Y_0 >= -d
    for beyond, accepted in ((-1e-3, True), (0.5 * COUNTEREXAMPLE_TOL, True),
                             (2 * COUNTEREXAMPLE_TOL, False)):
        region = Region(*box, [(row, np.array([-(y0 + beyond)]))])
        verdict = judge(runtime, point, region)
        assert verdict.accepted == accepted, beyond
        assert verdict.strict == (beyond <= 0), beyond
    inner = Region(np.array([0.3, 0.0]), np.ones(2), [(row, np.array([-y0 + 1.0]))])
    clipped = judge(runtime, point, inner)  # a candidate is reported clipped into the box
    assert clipped.x[0] == np.float32(0.3) and clipped.x[0] >= 0.3 and clipped.strict


def test_a_sat_meeting_an_unsat_is_a_soundness_conflict_exit_1(tmp_path, capsys):
    """exact finds the counterexample of a box past the decision boundary; the planted
    liar answers unsat: the command exits 1, and the summary and the report name it."""
    network = _planted(tmp_path)
    label = int(OnnxRuntime(network)(np.array([[0.5, 0.5]]))[0].argmax())
    (tmp_path / "p.vnnlib").write_text(robustness_vnnlib([0.0, 0.0], [1.0, 1.0], label, 3))
    (tmp_path / "instances.csv").write_text("net.onnx,p.vnnlib,30\n")
    code = main(["vnncomp", str(tmp_path / "instances.csv"), "--results", str(tmp_path / "out"),
                 "--verifiers", "exact", "test-spec-liar", "--import", "plugin_verifiers",
                 "--no-attack", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert "SOUNDNESS CONFLICT" in out and "sat by exact" in out
    assert "unsat by test-spec-liar" in out
    table = ResultsStore(tmp_path / "out").read("instances")
    assert set(table["result"]) == {"sat", "unsat"}
    page = build_report(tmp_path / "out", tmp_path / "report")
    assert "SOUNDNESS CONFLICT" in page.read_text()
