"""certbench's VNN-COMP answers scored beside the competition's participants by the 2022
rule (`report.official`): hand-made results with known scores, the shared official
results read whole, and the report's and the command's sections."""

from __future__ import annotations

import pandas as pd
import pytest

from certbench.report.official import read_official, score_table, scored, truth, wrong_lines
from conftest import SHARED_DATA

OFFICIAL_2022 = SHARED_DATA / "vnncomp2022" / "official_results"


def _write(folder, tool: str, rows: list[tuple[str, str, float]]) -> None:
    """rows: (instance vnnlib stem, result word, run time); one network n.onnx."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"bench,./benchmarks/bench/onnx/n.onnx,./benchmarks/bench/vnnlib/{p}.vnnlib,"
             f"1.0,{result},{time}" for p, result, time in rows]
    (folder / f"{tool}.csv").write_text("\n".join(lines) + "\n")


def _ours(rows: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    """rows: (vnnlib stem, result, time_s, overhead_s) of certbench's verifier "v"."""
    return pd.DataFrame([{"benchmark": "bench", "instance": f"n__{p}", "verifier": "v",
                          "result": r, "time_s": t, "overhead_s": o} for p, r, t, o in rows])


def test_the_competitions_scoring_rule_on_hand_made_results(tmp_path):
    # tool a: overhead 2 s (its fastest solved run); tool b: overhead 1 s
    _write(tmp_path, "a", [("p1", "holds", 2.0), ("p2", "violated", 12.0),
                           ("p3", "holds", 30.0), ("p4", "run_instance_timeout", 60.0)])
    _write(tmp_path, "b", [("p1", "unsat", 1.5), ("p2", "sat", 3.1),
                           ("p3", "holds", 9.0), ("p4", "error_exit_code_1", 1.0)])
    official = read_official(tmp_path)
    assert set(official["result"]) == {"unsat", "sat", "timeout", "error"}
    consensus = truth(official)
    assert consensus[("bench", "n__p1")] == "unsat" and consensus[("bench", "n__p4")] == "-"
    # certbench: overhead 0.5 + 0 s; wrong on p3, alone on p4, slowest on p2
    ours = _ours([("p1", "unsat", 0.2, 0.5), ("p2", "sat", 20.0, 0.5),
                  ("p3", "sat", 1.0, 0.5), ("p4", "unsat", 4.0, 0.5)])
    rows = scored(official, ours).set_index(["tool", "instance"])["score"]
    # p1: times after overhead a 0, b 0.5, v 0.2 -> all clamp to 1 s: +2 each
    assert rows[("a", "n__p1")] == rows[("b", "n__p1")] == rows[("certbench v", "n__p1")] == 12
    # p2: b 1.6, a 10, v 19.8 -> b fastest +2, a second +1, v +0
    assert (rows[("b", "n__p2")], rows[("a", "n__p2")], rows[("certbench v", "n__p2")]) == (
        12, 11, 10)
    assert rows[("certbench v", "n__p3")] == -100  # sat against the unsat consensus
    assert rows[("certbench v", "n__p4")] == 12  # nobody else answered: correct and fastest
    table = score_table(official, ours).set_index("tool")
    assert table.loc["certbench v", "wrong"] == 1 and table.loc["certbench v", "score"] == -66
    assert table.loc["b", "percent_of_best"] == 100.0
    (line,) = wrong_lines(official, ours)
    assert "certbench v answered sat" in line and "consensus unsat" in line


def test_a_tie_between_sat_and_unsat_is_disputed_and_scores_nobody(tmp_path):
    _write(tmp_path, "a", [("p1", "holds", 5.0)])
    _write(tmp_path, "b", [("p1", "violated", 5.0)])
    rows = scored(read_official(tmp_path), _ours([("p1", "sat", 1.0, 0.1)]))
    assert (rows["truth"] == "disputed").all() and (rows["score"] == 0).all()


def test_a_folder_without_results_is_one_line(tmp_path):
    from certbench.errors import UserError
    with pytest.raises(UserError, match="no <tool>.csv"):
        read_official(tmp_path)


@pytest.mark.skipif(not OFFICIAL_2022.exists(), reason=f"no official results at {OFFICIAL_2022}")
def test_the_2022_official_results_read_whole():
    official = read_official(OFFICIAL_2022)
    assert official["tool"].nunique() == 11
    collins = official[official["benchmark"] == "collins_rul_cnn"]
    abc = collins[collins["tool"] == "alpha_beta_crown"]["result"].value_counts()
    assert abc["sat"] > 0 and abc["unsat"] > 0
    consensus = truth(official)
    assert set(consensus.unique()) <= {"sat", "unsat", "disputed", "-"}


def test_report_and_command_put_certbench_beside_the_participants(tmp_path, capsys):
    """A planted instance answered by exact; two participants that say the opposite on it
    make certbench's answer wrong against the consensus: red in the report, exit 1."""
    from test_vnncomp import _planted, robustness_vnnlib

    from certbench.cli import main
    from certbench.report.build import build_report

    network = _planted(tmp_path)
    label = int(network.module(__import__("torch").tensor([[0.5, 0.5]])).argmax())
    (tmp_path / "p.vnnlib").write_text(robustness_vnnlib([0.49, 0.49], [0.51, 0.51], label, 3))
    (tmp_path / "instances.csv").write_text("net.onnx,p.vnnlib,30\n")
    args = ["vnncomp", str(tmp_path / "instances.csv"), "--results", str(tmp_path / "out"),
            "--verifiers", "exact", "--quiet", "--executor", "inline"]
    assert main(args) == 0
    answer = pd.read_parquet(tmp_path / "out" / "instances.parquet")["result"].item()
    assert answer in ("sat", "unsat")
    opposite = "violated" if answer == "unsat" else "holds"
    folder = tmp_path / "official"
    folder.mkdir()
    line = f"{tmp_path.name},./net.onnx,./p.vnnlib,1.0,{{}},2.0\n"
    (folder / "x.csv").write_text(line.format(opposite))
    (folder / "y.csv").write_text(line.format(opposite))
    assert main([*args, "--official", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"WRONG against the competition's consensus: certbench exact answered {answer}" in out
    page = build_report(tmp_path / "out", tmp_path / "report", folder).read_text()
    assert "Beside the competition" in page and "WRONG against" in page
