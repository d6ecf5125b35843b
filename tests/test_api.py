"""The Python API (`certbench.evaluate`) and ONNX models in a matrix: the same tables,
verifiers and soundness cross-check as `certbench run`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_vnncomp import mlp_onnx
from torch import nn

import certbench
from certbench.cli import main
from certbench.data import eval_indices, load_dataset
from certbench.errors import UserError
from certbench.io.onnx_import import OnnxRuntime, load_onnx
from certbench.matrix import parse_matrix
from certbench.verifiers import get_verifier


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return data.x_test[:24], data.y_test[:24]


@pytest.fixture(scope="module")
def model(digits):
    """A small MLP fitted briefly on digits (accurate enough that eps matters)."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(net(data.x_train), data.y_train)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


def test_evaluate_returns_the_run_tables_with_the_cross_check(model, digits):
    x, y = digits
    result = certbench.evaluate(model, x, y, verifiers=["ibp", "crown", ("alpha-crown", {
        "alpha_iterations": 5})], eps={"inf": [0.01, 0.03], "2": [0.1, 0.3]},
        norms=["inf", "2"], progress=False)
    assert len(result.cells) == 6 and (result.cells["status"] == "ok").all()
    assert (result.cells["soundness_violations"] == 0).all()
    assert set(result.samples["verdict"]) <= {"certified", "not_certified"}
    merged = result.certified.merge(result.cells, on="cell_key")
    assert (merged["certified_acc"] <= merged["attack_upper_bound"] + 1e-12).all()
    # the same margins as the verifier called directly
    crown = get_verifier("crown")
    crown.prepare(model, (1, 8, 8))
    direct = crown.certify(x, "inf", [0.01, 0.03]).columns["margin_lb"]
    key = result.cells.query("method == 'crown' and norm == 'inf'")["cell_key"].item()
    rows = result.samples[result.samples["cell_key"] == key]
    assert np.allclose(rows["margin_lb"].to_numpy(), direct.reshape(-1).numpy())
    # tightness: ibp <= crown <= alpha-crown in certified accuracy
    acc = merged.pivot_table(index=["norm", "eps"], columns="method", values="certified_acc")
    assert (acc["ibp"] <= acc["crown"]).all() and (acc["crown"] <= acc["alpha-crown"]).all()
    summary = result.summary()
    assert set(summary) == {"inf", "2"}
    assert {"verifier", "clean", "ms/sample", "cert@0.01", "cert@0.03"} <= set(summary["inf"])
    assert not any(c.startswith("cert@0.1") for c in summary["inf"])  # l2's grid apart
    winners = result.winners().query("norm == 'inf'").set_index("eps")
    assert (winners["best"] == acc.xs("inf")["alpha-crown"].to_numpy()).all()
    assert winners["winners"].str.contains("alpha-crown").all()


def test_evaluate_saves_a_results_folder_that_the_commands_read(model, digits, tmp_path,
                                                                 capsys):
    x, y = digits
    result = certbench.evaluate(model, x, y, verifiers=["crown"], eps=[0.01], progress=False,
                                attack=False)
    folder = result.save(tmp_path / "mine")
    assert pd.read_parquet(folder / "cells.parquet")["cell_key"].tolist() == \
        result.cells["cell_key"].tolist()
    assert main(["show", str(folder)]) == 0
    assert "crown" in capsys.readouterr().out


def test_evaluate_an_onnx_path_with_its_normalization(tmp_path, digits):
    """An ONNX MLP reading [1, 64] normalised inputs, evaluated on (1, 8, 8) digits: the
    classifier equals onnxruntime on the normalised, flattened input."""
    x, y = digits
    rng = np.random.default_rng(0)
    mlp_onnx(tmp_path / "net.onnx", [rng.normal(size=(16, 65)) / 8, rng.normal(size=(10, 17))])
    result = certbench.evaluate(tmp_path / "net.onnx", x, y, verifiers=["crown"],
                                eps=[0.001], normalization=([0.3], [0.4]), progress=False)
    assert result.cells["soundness_violations"].item() == 0
    reference = OnnxRuntime(load_onnx(tmp_path / "net.onnx"))(((x - 0.3) / 0.4).flatten(1))
    prediction = result.samples.drop_duplicates("sample_index")["prediction"].to_numpy()
    assert (prediction == reference.argmax(1)).all()


def test_evaluate_refuses_bad_input_with_a_clear_message(model, digits):
    x, y = digits
    with pytest.raises(UserError, match="unknown verifier"):
        certbench.evaluate(model, x, y, verifiers=["crwon"], progress=False)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        certbench.evaluate(model, x * 255, y, progress=False)
    with pytest.raises(UserError, match="labels"):
        certbench.evaluate(model, x, y[:3], progress=False)


def test_onnx_model_in_a_matrix_runs_every_family(tmp_path, capsys):
    rng = np.random.default_rng(1)
    mlp_onnx(tmp_path / "net.onnx", [rng.normal(size=(16, 65)) / 8, rng.normal(size=(10, 17))])
    matrix = tmp_path / "m.toml"
    matrix.write_text(f"""
name = "onnx-digits"
dataset = "digits"
samples = 20
norms = ["2", "inf"]
eps = {{ "2" = [0.05], "inf" = [0.005] }}
attack = {{ steps = 10, restarts = 1, targeted = 0, bisection_steps = 2 }}

[[models]]
name = "third-party"
onnx = "{tmp_path / 'net.onnx'}"
normalization = {{ mean = [0.3], std = [0.4] }}

[[verifiers]]
name = "global-lipschitz"

[[verifiers]]
name = "local-lipschitz"
options = {{ estimate_points = 0 }}

[[verifiers]]
name = "crown"
""")
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "out"),
                 "--quiet", "--samples", "16"]) == 0
    cells = pd.read_parquet(tmp_path / "out" / "cells.parquet")
    assert len(cells) == 6 and (cells["status"] == "ok").all()
    assert (cells["n_samples"] == 16).all()  # --samples overrides the matrix
    assert (cells["arch"] == "onnx").all() and (cells["soundness_violations"] == 0).all()
    data = load_dataset("digits")
    indices = eval_indices(len(data.y_test), 16)
    reference = OnnxRuntime(load_onnx(tmp_path / "net.onnx"))(
        ((data.x_test[indices] - 0.3) / 0.4).flatten(1))
    accuracy = reference.argmax(1) == data.y_test[indices].numpy()
    assert cells["clean_acc"].iloc[0] == pytest.approx(accuracy.mean())


@pytest.mark.parametrize("model, message", [
    ({"name": "m", "onnx": "a.onnx", "arch": "mlp"}, "exactly one of"),
    ({"name": "m", "arch": "mlp", "normalization": {"mean": [0.1], "std": [0.2]}},
     "`normalization` is for `onnx`"),
    ({"name": "m", "onnx": "a.onnx", "normalization": {"mean": [0.1], "std": [0.0]}},
     "positive"),
])
def test_matrix_validates_onnx_models(model, message):
    with pytest.raises(UserError, match=message):
        parse_matrix({"name": "x", "dataset": "digits", "eps": [0.1], "models": [model],
                      "verifiers": [{"name": "crown"}]})


def test_missing_onnx_file_in_a_matrix_is_a_user_error(tmp_path, capsys):
    matrix = tmp_path / "m.toml"
    matrix.write_text('name = "x"\ndataset = "digits"\neps = [0.1]\n'
                      '[[models]]\nname = "m"\nonnx = "nowhere.onnx"\n'
                      '[[verifiers]]\nname = "crown"\n')
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "out"),
                 "--quiet", "--data-dir", str(tmp_path)]) == 2
    assert "nowhere.onnx not found" in capsys.readouterr().err
