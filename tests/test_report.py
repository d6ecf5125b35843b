"""`certbench report` and `certbench compare` on a real (small) run: every section and
figure present, the page rendered by headless Chromium with every image loaded, and the
comparison failing on a planted slowdown and a planted accuracy drop."""

from __future__ import annotations

import re
import shutil
import subprocess

import matplotlib.image
import pandas as pd
import pytest
from test_runner import small_matrix

from certbench.cli import main
from certbench.report.build import FIGURES, SECTIONS
from certbench.run.runner import run_matrix


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    spec = small_matrix(
        samples=30,
        verifiers=[{"name": "global-lipschitz"}, {"name": "crown-ibp"},
                   {"name": "smoothing", "options": {"n": 500}},
                   {"name": "smoothing", "options": {"n": 4000, "sequential": True}}],
        attack={"steps": 20, "restarts": 1, "smoothing_check_n": 500},
    )
    run_matrix(spec, folder / "results", folder / "ckpt", progress=False, log=lambda _: None)
    return folder / "results"


def test_report_has_every_section_table_and_figure(results, tmp_path, capsys):
    assert main(["report", str(results), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    for section in SECTIONS:
        if section != "violations":
            assert f"id='{section}'" in page
    assert "id='violations'" not in page  # nothing to report
    assert page.count("data:image/png;base64,") == len(FIGURES)
    for key in FIGURES:
        image = matplotlib.image.imread(tmp_path / "rep" / "figures" / f"{key}.png")
        assert image.shape[0] > 200 and image.shape[1] > 300
    assert "smoothing[n=500]†" in page and "PGD upper bound" in page
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert markdown.count("](figures/") == len(FIGURES)
    assert "### std, l2" in markdown and "| verifier" in markdown
    assert "git commit" in markdown
    draws = markdown.split("### Randomized smoothing: noise draws")[1].split("##")[0]
    assert "sequential" in draws and "fixed N" in draws and re.search(r"\|\s+600\s+\|", draws)


def test_violations_are_shown_first_in_red(results, tmp_path):
    planted = tmp_path / "planted"
    shutil.copytree(results, planted)
    cells = pd.read_parquet(planted / "cells.parquet")
    cells.loc[cells["verifier"] == "crown-ibp", "soundness_violations"] = 3
    cells.to_parquet(planted / "cells.parquet")
    assert main(["report", str(planted), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "class='violations'" in page
    assert page.index("id='violations'") < page.index("id='tables'")
    assert "SOUNDNESS VIOLATION: std / crown-ibp / l2: 3 certified" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: "
                    "apt-get install chromium)")
def test_report_renders_in_headless_chromium(results, tmp_path):
    main(["report", str(results), "--out", str(tmp_path / "rep")])
    page = (tmp_path / "rep" / "index.html").read_text()
    probe = ("<script>window.addEventListener('load', () => { const imgs = [...document."
             "images]; document.body.setAttribute('data-loaded', imgs.filter(i => i.complete "
             "&& i.naturalWidth > 0).length + '/' + imgs.length); });</script></body>")
    (tmp_path / "rep" / "probe.html").write_text(page.replace("</body>", probe))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(flags + ["--dump-dom", (tmp_path / "rep" / "probe.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-loaded="(\d+)/(\d+)"', dom)
    assert loaded and loaded.group(1) == loaded.group(2) == str(len(FIGURES))
    for section in SECTIONS[1:]:
        assert f'id="{section}"' in dom
    shot = tmp_path / "rep" / "screenshot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,3000",
                            (tmp_path / "rep" / "index.html").as_uri()],
                   capture_output=True, timeout=120)
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (3000, 1200) and image.std() > 0.05  # not a blank page


def _planted(results, tmp_path, name, change):
    folder = tmp_path / name
    shutil.copytree(results, folder)
    for table in ("cells", "certified"):
        frame = pd.read_parquet(folder / f"{table}.parquet")
        frame = change(table, frame)
        frame.to_parquet(folder / f"{table}.parquet")
    return folder


def test_compare_passes_identical_runs_and_fails_planted_regressions(results, tmp_path, capsys):
    args = ["--max-slowdown", "1.2", "--max-acc-drop", "0.0"]
    assert main(["compare", str(results), str(results), *args]) == 0
    assert "comparison passed" in capsys.readouterr().out

    steady = [0.100, 0.104, 0.098, 0.101, 0.097, 0.103, 0.099, 0.102]

    def timed(factor):
        def change(table, frame):
            if table == "cells":
                rows = frame.index[frame["verifier"] == "crown-ibp"]
                frame["certify_runs_s"] = frame["certify_runs_s"].astype(object)
                for i in rows:
                    frame.at[i, "certify_runs_s"] = [factor * t for t in steady]
            return frame
        return change

    baseline = _planted(results, tmp_path, "steady", timed(1.0))
    assert main(["compare", str(baseline), str(_planted(results, tmp_path, "slow",
                                                        timed(1.5))), *args]) == 1
    out = capsys.readouterr().out
    assert "1.50x slower (wall clock), 95% interval [" in out and "comparison failed" in out
    assert main(["compare", str(baseline), str(_planted(results, tmp_path, "slight",
                                                        timed(1.05))), *args]) == 0
    capsys.readouterr()

    def weaker(table, frame):
        if table == "certified":
            frame["certified_acc"] = (frame["certified_acc"] - 0.05).clip(lower=0)
        return frame

    assert main(["compare", str(results), str(_planted(results, tmp_path, "weak", weaker)),
                 *args]) == 1
    assert "certified accuracy dropped by" in capsys.readouterr().out

    def fewer(table, frame):
        if table == "cells":
            frame = frame[frame["verifier"] != "crown-ibp"]
        return frame

    assert main(["compare", str(results), str(_planted(results, tmp_path, "fewer", fewer)),
                 *args]) == 0
    assert "only in baseline: std / crown-ibp / l2" in capsys.readouterr().out


def test_eps_labels_and_who_wins_where():
    """Epsilons of k/255 read as such; the overview names the best deterministic verifier
    (ties: all of them, fastest first), the fastest within a point, smoothing apart; the
    per-model tables mark the best deterministic value in bold."""
    from certbench.report.build import marked
    from certbench.report.view import ResultsView, eps_label

    assert [eps_label(e) for e in (1 / 255, 8 / 255, 0.1, 0.00392, 1.0, 0.2)] == \
        ["1/255", "8/255", "0.1", "0.00392", "1", "0.2"]
    cells = pd.DataFrame({
        "cell_key": ["a", "b", "c", "d"], "model": "m", "norm": "inf",
        "verifier": ["ibp", "crown", "alpha-crown", "smoothing"], "clean_acc": 0.9,
        "probabilistic": [False, False, False, True], "status": "ok",
        "per_sample_s": [0.001, 0.002, 0.01, 0.5], "setup_s": 0.0,
        "peak_mem_bytes": 1, "certify_s": 0.1})
    certified = pd.DataFrame({"cell_key": ["a", "b", "c", "d"], "eps": 2 / 255,
                              "certified_acc": [0.50, 0.705, 0.71, 0.8]})
    view = ResultsView.of(cells, certified)
    (row,) = view.winners().to_dict("records")
    assert row["eps"] == "2/255" and row["best"] == 0.71 and row["winners"] == "alpha-crown"
    assert row["fastest within 0.01"] == "crown" and row["its ms/sample"] == 2.0
    assert row["smoothing†"] == 0.8
    table = view.cell_table(view.cells)
    shown = marked(table.reset_index(drop=True), "**{}**".format)
    assert shown["cert@2/255"].tolist() == ["0.5", "0.705", "**0.71**", "0.8"]
