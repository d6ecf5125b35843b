"""The zoo: every catalogue entry is a recipe certbench can train; ``zoo:NAME`` loads a
built network by name; every built network's card matches its catalogue entry, its
certificates survive PGD on fresh points, and its global bound lies above the gradients
sampled around test points."""

from __future__ import annotations

import pytest
import torch

from certbench import zoo
from certbench.api import evaluate
from certbench.data import DATASETS, load_dataset
from certbench.errors import UserError
from certbench.matrix import load_matrix
from certbench.models import ARCHITECTURES, load_checkpoint
from certbench.report.papers import papers_table
from certbench.report.view import ResultsView
from certbench.run.executors import InlineExecutor
from certbench.run.runner import run_matrix
from certbench.training.recipes import recipe_args
from certbench.verifiers.global_lipschitz import LipschitzGraph
from conftest import mnist_dir

BUILT = [name for name in zoo.catalog() if zoo.card(name) is not None]


@pytest.mark.parametrize("name", list(zoo.catalog()))
def test_catalogue_entries_are_trainable_recipes(name):
    entry = zoo.catalog()[name]
    assert entry.dataset in DATASETS and entry.arch in ARCHITECTURES
    args = recipe_args(entry.recipe, entry.recipe_args)  # raises on a bad argument
    assert args["epochs"] >= 1


def test_unknown_zoo_names_are_refused_with_the_list():
    with pytest.raises(UserError, match="gloro-mnist-2c2f"):
        zoo.network_stem("zoo:no-such-network")


def test_unbuilt_networks_say_how_to_build_them(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "FOLDER", tmp_path)
    with pytest.raises(UserError, match="certbench zoo --build gloro-mnist-2c2f"):
        zoo.network_stem("zoo:gloro-mnist-2c2f")
    assert all(row["certbench"] is None for row in zoo.listing())


def test_verified_error_is_one_minus_certified_accuracy():
    assert zoo.as_metric("verified error", 0.93) == pytest.approx(0.07)
    assert zoo.as_metric("VRA", 0.93) == 0.93


@pytest.mark.skipif(not BUILT, reason="no zoo network is built in this checkout")
@pytest.mark.parametrize("name", BUILT)
def test_built_network_matches_its_entry_and_its_certificates_hold(name):
    entry = zoo.catalog()[name]
    model, card = load_checkpoint(zoo.network_stem(f"zoo:{name}"))  # checks the sha256
    assert card["recipe"] == entry.recipe and card["arch"] == entry.arch
    assert card["recipe_args"] == recipe_args(entry.recipe, entry.recipe_args)
    measured = card["zoo"]["measured"]
    assert measured["soundness_violations"] == 0
    assert measured["certified_acc"] <= measured["attack_upper_bound"] <= measured["clean_acc"]
    data = load_dataset(entry.dataset, mnist_dir().parent)
    # fresh points (the end of the test set), the measurement's verifier and PGD
    x, y = data.x_test[-300:], data.y_test[-300:]
    result = evaluate(model, x, y, verifiers=[(entry.measure.verifier,
                                                   entry.measure.options)],
                          eps={entry.paper.norm: [entry.paper.eps]}, norms=entry.paper.norm,
                          progress=False)
    cell = result.cells.iloc[0]
    assert cell["status"] == "ok" and cell["soundness_violations"] == 0
    if entry.measure.verifier == "global-lipschitz":
        _bound_lies_above_sampled_gradients(model, card, x[:40])


def _bound_lies_above_sampled_gradients(model, card, x):
    """||grad (f_i - f_j)||_2 at points around x never exceeds the pairwise bound K_ij."""
    bounds = LipschitzGraph(model, card["input_shape"]).bounds(torch.float64)
    pairwise = bounds.pairwise()
    torch.manual_seed(0)
    points = (x + 0.3 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    logits = model(points)
    classes = logits.shape[1]
    for i in range(classes):
        for j in range(i + 1, classes):
            (grad,) = torch.autograd.grad((logits[:, i] - logits[:, j]).sum(), points,
                                          retain_graph=True)
            largest = grad.flatten(1).norm(dim=1).max().item()
            assert largest <= pairwise[i, j].item() * (1 + 1e-5), (i, j)


def test_the_seeds_matrix_names_catalogued_networks():
    spec = load_matrix("seeds")
    references = [m.checkpoint for m in spec.models]
    assert references and all(r.startswith(zoo.PREFIX) for r in references)
    assert {r.removeprefix(zoo.PREFIX) for r in references} <= set(zoo.catalog())


@pytest.mark.skipif(not BUILT, reason="no zoo network is built in this checkout")
def test_the_seeds_matrix_runs_on_the_committed_zoo(tmp_path):
    """Provisioning finds ``zoo:`` checkpoints without training (the checkpoint folder
    stays empty) and the report puts the results beside the papers."""
    spec = load_matrix("seeds").model_copy(update={"samples": 20})
    built = [m for m in spec.models if m.checkpoint.removeprefix(zoo.PREFIX) in BUILT]
    spec = spec.model_copy(update={"models": built})
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", data_dir=mnist_dir().parent,
                       progress=False, log=lambda _: None, executor=InlineExecutor())
    assert set(cells["status"]) == {"ok"} and not (tmp_path / "c").exists()
    table = papers_table(ResultsView.load(tmp_path / "r"))
    assert len(table) == len(cells)
    assert set(table["network"]) == {m.checkpoint.removeprefix(zoo.PREFIX) for m in built}
