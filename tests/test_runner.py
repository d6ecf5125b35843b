"""The harness end to end: tables on disk that pandas reads, skipping finished cells,
recording failures, and the difference that certified training makes."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from certbench.errors import UserError
from certbench.matrix import parse_matrix
from certbench.provenance import canonical_json
from certbench.run.runner import run_matrix
from certbench.verifiers import get_verifier

CELL_COLUMNS = (
    "cell_key run_id model dataset arch recipe checkpoint_sha256 verifier method options norm "
    "device n_samples clean_acc status error setup_s certify_s per_sample_s peak_mem_bytes "
    "mem_kind probabilistic alpha versions git_commit started_at finished_at"
).split()
SAMPLE_COLUMNS = "cell_key sample_index label prediction eps verdict radius time_s".split()


def small_matrix(**overrides):
    data = {
        "name": "small", "dataset": "digits", "samples": 40, "norms": ["2", "inf"],
        "eps": {"2": [0.1, 0.5], "inf": [0.01, 0.05]}, "device": "cpu",
        "models": [
            {"name": "std", "arch": "mlp", "arch_args": {"widths": [32]},
             "recipe_args": {"epochs": 3}},
            {"name": "gloro", "arch": "mlp", "arch_args": {"widths": [32]}, "recipe": "gloro",
             "recipe_args": {"epochs": 3, "eps": 0.3}},
        ],
        "verifiers": [{"name": "global-lipschitz"},
                      {"name": "global-lipschitz", "options": {"bound": "lmt"}}],
    }
    data.update(overrides)
    return parse_matrix(data)


@pytest.fixture
def ran(tmp_path):
    spec = small_matrix()
    logs = []
    run_matrix(spec, tmp_path / "results", tmp_path / "ckpt", progress=False, log=logs.append)
    return spec, tmp_path, logs


def test_tables_are_written_with_the_public_columns(ran):
    _, tmp_path, logs = ran
    cells = pd.read_parquet(tmp_path / "results" / "cells.parquet")
    samples = pd.read_parquet(tmp_path / "results" / "samples.parquet")
    certified = pd.read_parquet(tmp_path / "results" / "certified.parquet")
    assert set(CELL_COLUMNS) <= set(cells.columns)
    assert set(SAMPLE_COLUMNS) <= set(samples.columns)
    assert {"cell_key", "eps", "certified_acc", "attack_upper_bound"} <= set(certified.columns)
    assert len(cells) == 8 and (cells["status"] == "ok").all()
    assert len(samples) == 8 * 40 * 2 and len(certified) == 8 * 2
    assert logs == [logs[0]] and logs[0].startswith("8 cell(s) run, 0 already done")
    assert set(samples["verdict"]) <= {"certified", "not_certified"}
    assert json.loads(cells["versions"].iloc[0])["torch"]


def test_certified_accuracy_agrees_with_the_per_sample_verdicts(ran):
    _, tmp_path, _ = ran
    samples = pd.read_parquet(tmp_path / "results" / "samples.parquet")
    certified = pd.read_parquet(tmp_path / "results" / "certified.parquet")
    ok = (samples["verdict"] == "certified") & (samples["prediction"] == samples["label"])
    recomputed = ok.groupby([samples["cell_key"], samples["eps"]]).mean().rename("again")
    merged = certified.join(recomputed, on=["cell_key", "eps"])
    assert (merged["certified_acc"] - merged["again"]).abs().max() < 1e-12
    # a certified verdict at eps means the radius exceeds eps
    cert = samples[samples["verdict"] == "certified"]
    assert (cert["radius"] > cert["eps"]).all()


def test_rerun_skips_finished_cells_and_force_recomputes(ran):
    spec, tmp_path, _ = ran
    logs = []
    run_matrix(spec, tmp_path / "results", tmp_path / "ckpt", progress=False, log=logs.append)
    assert logs[0].startswith("0 cell(s) run, 8 already done")
    run_matrix(spec, tmp_path / "results", tmp_path / "ckpt", force=True, progress=False,
               log=logs.append)
    assert logs[1].startswith("8 cell(s) run, 0 already done")
    cells = pd.read_parquet(tmp_path / "results" / "cells.parquet")
    assert len(cells) == 8 and cells["cell_key"].is_unique


def test_a_changed_epsilon_grid_is_a_new_cell(ran):
    spec, tmp_path, _ = ran
    other = small_matrix(eps={"2": [0.2], "inf": [0.01, 0.05]})
    logs = []
    run_matrix(other, tmp_path / "results", tmp_path / "ckpt", progress=False, log=logs.append)
    assert logs[0].startswith("4 cell(s) run, 4 already done")


def test_a_model_with_its_own_norms_and_radii_runs_only_at_those(ran):
    spec, tmp_path, _ = ran
    models = [m.model_dump() for m in spec.models]
    models[1]["norms"] = ["2"]
    models[1]["eps"] = {"2": [0.3]}
    logs = []
    run_matrix(small_matrix(models=models), tmp_path / "fresh", tmp_path / "ckpt",
               progress=False, log=logs.append)
    cells = pd.read_parquet(tmp_path / "fresh" / "cells.parquet")
    certified = pd.read_parquet(tmp_path / "fresh" / "certified.parquet")
    assert logs[0].startswith("6 cell(s) run")
    assert set(cells[cells.model == "gloro"].norm) == {"2"}
    assert set(cells[cells.model == "std"].norm) == {"2", "inf"}
    at = certified.merge(cells[["cell_key", "model", "norm"]], on="cell_key")
    assert set(at[at.model == "gloro"].eps) == {0.3}
    assert set(at[(at.model == "std") & (at.norm == "2")].eps) == {0.1, 0.5}
    with pytest.raises(UserError, match="must be among the matrix's norms"):
        small_matrix(norms=["2"], eps=[0.1], models=models[:1] + [{**models[1], "norms": ["inf"]}])
    with pytest.raises(UserError, match="eps is a table of the model's norms"):
        small_matrix(models=models[:1] + [{**models[1], "eps": {"inf": [0.1]}}])


def test_a_model_with_its_own_verifiers_runs_only_under_those(ran):
    """A model's ``verifiers`` picks the matrix's verifiers by label (one of two entries of
    the same verifier) or by name (every entry of it); the other models run under all."""
    spec, tmp_path, _ = ran
    models = [m.model_dump() for m in spec.models]
    models[1]["verifiers"] = ["global-lipschitz[bound=lmt]"]
    logs = []
    run_matrix(small_matrix(models=models), tmp_path / "picked", tmp_path / "ckpt",
               progress=False, log=logs.append)
    cells = pd.read_parquet(tmp_path / "picked" / "cells.parquet")
    assert len(cells) == 6
    assert set(cells[cells.model == "gloro"].options) == {canonical_json({"bound": "lmt"})}
    models[1]["verifiers"] = ["global-lipschitz"]
    run_matrix(small_matrix(models=models), tmp_path / "results", tmp_path / "ckpt",
               progress=False, log=logs.append)
    assert logs[1].startswith("0 cell(s) run, 8 already done")
    with pytest.raises(UserError, match=r"verifiers \['crown'\] are not among"):
        small_matrix(models=models[:1] + [{**models[1], "verifiers": ["crown"]}])
    with pytest.raises(UserError, match="at least 1 item"):
        small_matrix(models=models[:1] + [{**models[1], "verifiers": []}])


def test_a_model_with_its_own_attack_settings_gets_them_in_its_cells(ran):
    """A model's ``attack`` replaces those fields of the matrix's attack for its cells only
    (and is part of their keys); unknown fields and bad values are refused by name."""
    spec, tmp_path, _ = ran
    models = [m.model_dump() for m in spec.models]
    models[1]["attack"] = {"bisection_steps": 0, "restarts": 1}
    logs = []
    run_matrix(small_matrix(models=models), tmp_path / "results", tmp_path / "ckpt",
               progress=False, log=logs.append)
    assert logs[0].startswith("4 cell(s) run, 4 already done")
    cells = pd.read_parquet(tmp_path / "results" / "cells.parquet")
    attacks = {model: {json.loads(a)["restarts"] for a in group.attack}
               for model, group in cells.groupby("model")}
    assert attacks == {"std": {3}, "gloro": {1, 3}}  # gloro's first run kept, plus the new
    mine = cells[(cells.model == "gloro") & cells.attack.str.contains('"restarts":1')]
    assert len(mine) == 4 and {json.loads(a)["bisection_steps"] for a in mine.attack} == {0}
    with pytest.raises(UserError, match=r"models\.1\.attack: steps: Input should be greater"):
        small_matrix(models=models[:1] + [{**models[1], "attack": {"steps": 0}}])
    with pytest.raises(UserError, match=r"models\.1\.attack: bisection: unknown key"):
        small_matrix(models=models[:1] + [{**models[1], "attack": {"bisection": 0}}])


def test_a_failing_cell_is_recorded_and_the_run_goes_on(tmp_path):
    spec = small_matrix(
        imports=["plugin_verifiers"],
        verifiers=[{"name": "test-failing"}, {"name": "global-lipschitz"}],
        models=[{"name": "std", "arch": "mlp", "arch_args": {"widths": [16]},
                 "recipe_args": {"epochs": 1}}],
    )
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False, log=lambda _: None)
    failed = cells[cells["status"] == "error"]
    assert len(failed) == 2 and failed["error"].str.contains("planted failure").all()
    assert (cells[cells["verifier"] == "global-lipschitz"]["status"] == "ok").all()
    logs = []
    run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False, log=logs.append)
    assert logs[0].startswith("2 cell(s) run, 2 already done")  # failures are retried


def test_a_failing_diagnostic_keeps_the_certificate(tmp_path):
    spec = small_matrix(
        imports=["plugin_verifiers"], norms=["2"], eps={"2": [0.1, 0.5]},
        verifiers=[{"name": "test-failing-diagnostics"}],
        models=[{"name": "std", "arch": "mlp", "arch_args": {"widths": [16]},
                 "recipe_args": {"epochs": 1}}],
    )
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False, log=lambda _: None)
    assert (cells["status"] == "ok").all()
    assert cells["diagnostics_error"].str.contains("planted diagnostic failure").all()
    certified = pd.read_parquet(tmp_path / "r" / "certified.parquet")
    assert len(certified) == 2 and certified["certified_acc"].notna().all()


def test_certified_training_certifies_far_more_than_standard(trained, digits):
    """At l2 eps 0.5 on digits the GloRo- and LMT-trained MLPs keep most of their accuracy
    certified; the standard MLP keeps almost none."""
    x, y = digits.x_test, digits.y_test
    acc = {}
    for name in ("mlp-standard", "mlp-gloro", "mlp-lmt"):
        verifier = get_verifier("global-lipschitz")
        verifier.prepare(trained[name], x.shape[1:])
        cert = verifier.certify(x, "2", [0.5])
        acc[name] = ((cert.prediction == y) & (cert.radius > 0.5)).float().mean().item()
    assert acc["mlp-gloro"] > acc["mlp-standard"] + 0.3
    assert acc["mlp-lmt"] > acc["mlp-standard"] + 0.3


def test_attack_upper_bound_dominates_certified_accuracy(ran):
    _, tmp_path, _ = ran
    certified = pd.read_parquet(tmp_path / "results" / "certified.parquet")
    cells = pd.read_parquet(tmp_path / "results" / "cells.parquet")
    samples = pd.read_parquet(tmp_path / "results" / "samples.parquet")
    assert certified["attack_upper_bound"].notna().all()
    assert (certified["attack_upper_bound"] >= certified["certified_acc"]).all()
    assert (cells["soundness_violations"] == 0).all() and (cells["attack_s"] > 0).all()
    merged = certified.merge(cells[["cell_key", "clean_acc"]], on="cell_key")
    assert (merged["attack_upper_bound"] <= merged["clean_acc"]).all()
    assert (merged["attack_upper_bound"] < merged["clean_acc"]).any()  # the attack bites
    certified_rows = samples[samples["verdict"] == "certified"]
    assert (certified_rows["radius"] <= certified_rows["adv_distance"]).all()


def test_a_lying_verifier_is_caught_and_run_exits_non_zero(tmp_path, capsys, monkeypatch):
    from certbench.cli import main

    monkeypatch.setenv("CERTBENCH_CHECKPOINTS", str(tmp_path / "c"))
    matrix = tmp_path / "m.toml"
    matrix.write_text(
        'name = "liar"\ndataset = "digits"\nsamples = 30\nnorms = ["2"]\neps = [0.5, 1.0]\n'
        'imports = ["plugin_verifiers"]\ndevice = "cpu"\n'
        '[[models]]\nname = "std"\narch = "mlp"\narch_args = { widths = [16] }\n'
        'recipe_args = { epochs = 2 }\n'
        '[[verifiers]]\nname = "test-liar"\n[[verifiers]]\nname = "global-lipschitz"\n'
    )
    code = main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and "soundness violations" in err
    assert "SOUNDNESS VIOLATION: std / test-liar / l2" in out
    cells = pd.read_parquet(tmp_path / "r" / "cells.parquet").set_index("verifier")
    assert cells.loc["test-liar", "soundness_violations"] > 0
    assert cells.loc["global-lipschitz", "soundness_violations"] == 0


def test_smoothing_and_local_lipschitz_cells(tmp_path):
    spec = small_matrix(
        norms=["2"], eps=[0.1, 0.25], samples=20,
        models=[{"name": "noise", "arch": "mlp", "arch_args": {"widths": [32]},
                 "recipe": "noise", "recipe_args": {"epochs": 5, "sigma": 0.25}}],
        verifiers=[{"name": "smoothing", "options": {"n": 2000, "sigma": 0.25}},
                   {"name": "local-lipschitz"}, {"name": "global-lipschitz"}],
        attack={"smoothing_check_n": 2000, "steps": 20, "restarts": 1},
    )
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False,
                       log=lambda _: None).set_index("method")
    assert (cells["status"] == "ok").all(), cells["error"]
    assert cells.loc["smoothing", "probabilistic"] and cells.loc["smoothing", "alpha"] == 0.001
    assert cells.loc["smoothing", "probabilistic_violations"] == 0
    assert cells.loc["local-lipschitz", "soundness_violations"] == 0
    certified = pd.read_parquet(tmp_path / "r" / "certified.parquet").merge(
        cells.reset_index()[["cell_key", "method"]], on="cell_key").set_index(["method", "eps"])
    assert certified.loc["smoothing", "attack_upper_bound"].isna().all()
    local = certified.loc["local-lipschitz", "certified_acc"]
    assert (local >= certified.loc["global-lipschitz", "certified_acc"]).all()
    samples = pd.read_parquet(tmp_path / "r" / "samples.parquet")
    smoothing = samples[samples["cell_key"] == cells.loc["smoothing", "cell_key"]]
    assert smoothing["p_a_lower"].notna().all() and (smoothing["time_s"] > 0).all()
    # the sampled estimate comes from `diagnostics`, run once and timed apart
    local_rows = samples[samples["cell_key"] == cells.loc["local-lipschitz", "cell_key"]]
    assert local_rows["lipschitz_estimate"].notna().all()
    assert (local_rows["lipschitz_bound"] >= local_rows["lipschitz_estimate"]).all()
    assert cells.loc["local-lipschitz", "diagnostics_s"] > 0
    assert pd.isna(cells.loc["global-lipschitz", "diagnostics_s"])


def test_a_lying_smoothing_verifier_is_caught_apart(tmp_path):
    spec = small_matrix(
        norms=["2"], eps=[1.0, 2.0], samples=20, imports=["plugin_verifiers"],
        models=[{"name": "noise", "arch": "mlp", "arch_args": {"widths": [32]},
                 "recipe": "noise", "recipe_args": {"epochs": 5, "sigma": 0.25}}],
        verifiers=[{"name": "test-smoothing-liar", "options": {"n": 500}}],
        attack={"smoothing_check_n": 2000, "steps": 20, "restarts": 1},
    )
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False, log=lambda _: None)
    assert cells["probabilistic_violations"].iloc[0] > 0
    assert pd.isna(cells["soundness_violations"].iloc[0])


def test_complete_verifiers_in_a_matrix_agree_and_bound_every_method(tmp_path):
    """bab and exact as matrix cells: the same verdicts per sample, certified accuracy at
    least every incomplete method's and at most the attack's bound, statistics columns
    in the per-sample table, no soundness violation."""
    spec = small_matrix(
        norms=["inf"], eps=[0.02, 0.06], samples=15,
        models=[{"name": "std", "arch": "mlp", "arch_args": {"widths": [32]},
                 "recipe_args": {"epochs": 3}}],
        verifiers=[{"name": "bab"}, {"name": "exact"}, {"name": "crown"},
                   {"name": "alpha-crown"}],
    )
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False,
                       log=lambda _: None).set_index("method")
    assert (cells["status"] == "ok").all(), cells["error"]
    assert (cells["soundness_violations"] == 0).all()
    samples = pd.read_parquet(tmp_path / "r" / "samples.parquet")
    verdicts = {m: samples[samples["cell_key"] == cells.loc[m, "cell_key"]].set_index(
        ["sample_index", "eps"])["verdict"].sort_index() for m in cells.index}
    assert verdicts["bab"].equals(verdicts["exact"])
    assert verdicts["bab"].isin(["certified", "falsified"]).all()
    bab = samples[samples["cell_key"] == cells.loc["bab", "cell_key"]]
    assert {"bab_domains", "bab_bound_s", "bab_branch_s", "falsify_s"} <= set(bab.columns)
    certified = pd.read_parquet(tmp_path / "r" / "certified.parquet").merge(
        cells.reset_index()[["cell_key", "method"]], on="cell_key").set_index(["method", "eps"])
    acc = certified["certified_acc"]
    for method in ("crown", "alpha-crown"):
        assert (acc.loc["bab"] >= acc.loc[method]).all()
    assert (acc.loc["bab"] <= certified.loc["bab", "attack_upper_bound"]).all()


def test_a_cross_check_that_did_not_run_is_said_and_retried(tmp_path, capsys, monkeypatch):
    """An attack past its limit (the matrix's timeout times the cells it serves) leaves
    its cells certified but unchecked: `show` says so on a line of its own, `run` exits 3,
    and the next run (with room for the attack) redoes those cells with the cross-check."""
    from certbench.cli import main

    monkeypatch.setenv("CERTBENCH_CHECKPOINTS", str(tmp_path / "c"))
    matrix = tmp_path / "m.toml"
    text = ('name = "hurried"\ndataset = "digits"\nsamples = 60\nnorms = ["2"]\n'
            'eps = [0.5]\ndevice = "cpu"\ntimeout_s = 0.001\n'
            '[[models]]\nname = "std"\narch = "mlp"\narch_args = { widths = [16] }\n'
            'recipe_args = { epochs = 1 }\n'
            '[[verifiers]]\nname = "global-lipschitz"\ntimeout_s = 60\n'
            '[[verifiers]]\nname = "global-lipschitz"\noptions = { bound = "lmt" }\n'
            'timeout_s = 60\n')
    matrix.write_text(text)
    args = ["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--quiet"]
    assert main(args) == 3
    out, err = capsys.readouterr()
    assert "NOT CROSS-CHECKED: std / l2: the PGD attack did not finish (timeout" in out
    assert "2 cell(s) are certified but unchecked" in out
    assert "without the PGD cross-check" in err
    cells = pd.read_parquet(tmp_path / "r" / "cells.parquet")
    assert (cells["status"] == "ok").all() and cells["attack_error"].notna().all()
    matrix.write_text(text.replace("timeout_s = 0.001", "timeout_s = 60"))
    assert main(args) == 0
    out, _ = capsys.readouterr()
    assert "NOT CROSS-CHECKED" not in out and "2 cell(s) run" in out
    cells = pd.read_parquet(tmp_path / "r" / "cells.parquet")
    assert cells["attack_error"].isna().all() and (cells["soundness_violations"] == 0).all()


def test_a_plugin_next_to_the_matrix_is_found_here_and_in_the_workers(tmp_path, monkeypatch):
    """A matrix's `imports` module beside the matrix file, run from another folder, with
    no PYTHONPATH: found by the driver and by each cell's worker process."""
    from certbench.matrix import PLUGIN_PATH, load_matrix
    from certbench.run.executors import ProcessExecutor

    monkeypatch.setenv(PLUGIN_PATH, "")
    study = tmp_path / "study"
    study.mkdir()
    (study / "sideplugin_c81f.py").write_text(
        "from certbench.verifiers import register\n"
        "from certbench.verifiers.global_lipschitz import GlobalLipschitzVerifier\n\n\n"
        "@register('test-beside', 'global-lipschitz under another name')\n"
        "class Beside(GlobalLipschitzVerifier):\n    name = 'test-beside'\n")
    (study / "m.toml").write_text(
        'name = "beside"\ndataset = "digits"\nsamples = 10\nnorms = ["2"]\neps = [0.5]\n'
        'device = "cpu"\nimports = ["sideplugin_c81f"]\nattack = { enabled = false }\n'
        '[[models]]\nname = "std"\narch = "mlp"\narch_args = { widths = [8] }\n'
        'recipe_args = { epochs = 1 }\n[[verifiers]]\nname = "test-beside"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_matrix(study / "m.toml")
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False,
                       log=lambda _: None, executor=ProcessExecutor())
    assert cells["status"].tolist() == ["ok"], cells["error"].tolist()
