"""The zoo: every catalogue entry is a recipe certbench can train; ``zoo:NAME`` loads a
built network by name; every built network's card matches its catalogue entry, its
certificates survive PGD on fresh points, and its global bound lies above the gradients
sampled around test points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from certbench import zoo
from certbench.api import evaluate
from certbench.data import DATASETS, load_dataset
from certbench.errors import UserError
from certbench.matrix import load_matrix
from certbench.models import build_model, load_checkpoint
from certbench.report.papers import papers_section, papers_table
from certbench.report.view import ResultsView
from certbench.run.executors import InlineExecutor
from certbench.run.runner import run_matrix
from certbench.training.recipes import recipe_args
from certbench.verifiers.global_lipschitz import LipschitzGraph

BUILT = [name for name in zoo.catalog() if zoo.card(name) is not None]


@pytest.mark.parametrize("name", list(zoo.catalog()))
def test_catalogue_entries_are_trainable_recipes(name):
    """Every entry names a dataset, an architecture its arguments build, and a recipe
    whose arguments validate (each raises a UserError otherwise)."""
    entry = zoo.catalog()[name]
    assert entry.dataset in DATASETS
    shape = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}[entry.dataset]
    model = build_model(entry.arch, shape, 10, (0.5,), (0.5,), entry.arch_args)
    assert model(torch.zeros(1, *shape)).shape == (1, 10)
    assert recipe_args(entry.recipe, entry.recipe_args)["epochs"] >= 1


def test_unknown_zoo_names_are_refused_with_the_list():
    with pytest.raises(UserError, match="gloro-mnist-2c2f"):
        zoo.network_stem("zoo:no-such-network")


def test_unbuilt_networks_say_how_to_build_them(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "FOLDER", tmp_path)
    with pytest.raises(UserError, match="certbench zoo --build gloro-mnist-2c2f"):
        zoo.network_stem("zoo:gloro-mnist-2c2f")
    assert all(row["certbench"] is None for row in zoo.listing())


def test_the_listing_says_how_far_each_network_is(monkeypatch, tmp_path, capsys):
    """not built -> training N/epochs (a resume point) -> measuring (weights and a card
    without figures) -> built."""
    from safetensors.torch import save_file

    from certbench.cli import main
    from certbench.zoo_build import status

    monkeypatch.setattr(zoo, "FOLDER", tmp_path)
    name = "gloro-mnist-2c2f"
    assert status(name, 500) == "not built"
    save_file({"generator": torch.zeros(1)}, str(tmp_path / f"{name}.resume.safetensors"),
              metadata={"epoch": "37"})
    assert status(name, 500) == "training 37/500"
    main(["zoo"])  # the listing's status column
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.split()[:1] == [name])
    assert row.split()[1:3] == ["training", "37/500"]
    (tmp_path / f"{name}.json").write_text(json.dumps({"recipe": "gloro"}))
    assert status(name, 500) == "measuring"
    (tmp_path / f"{name}.json").write_text(json.dumps({"zoo": {"measured": {}}}))
    assert status(name, 500) == "built"


def test_verified_error_is_one_minus_certified_accuracy():
    assert zoo.as_metric("verified error", 0.93) == pytest.approx(0.07)
    assert zoo.as_metric("VRA", 0.93) == 0.93


def test_the_zoo_stays_small_float32_and_free_of_optimiser_state():
    """The issue's rule for the repository: under 40 MB, float32 weights, no optimiser
    state (resume points hold the weights and the data order only; Adam's moments stay in
    git-ignored files)."""
    files = [p for p in zoo.FOLDER.iterdir() if p.suffix in (".safetensors", ".json")]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    for path in (p for p in files if p.suffix == ".safetensors"):
        with safe_open(str(path), framework="pt") as found:
            for key in found.keys():
                dtype = found.get_slice(key).get_dtype()
                if path.name.endswith(".resume.safetensors"):
                    assert key == "generator" or key.startswith(("model.", "power.")), (path, key)
                    if key == "generator":
                        continue
                assert dtype in ("F32", "I64"), (path, key, dtype)  # I64: batch counters
    assert "/bench/zoo/networks/*.optimizer.pt" in (
        Path(__file__).parents[1] / ".gitignore").read_text().splitlines()


@pytest.mark.skipif(not BUILT, reason="no zoo network is built in this checkout")
@pytest.mark.parametrize("name", BUILT)
def test_built_network_matches_its_entry_and_its_certificates_hold(name, mnist_dir):
    entry = zoo.catalog()[name]
    model, card = load_checkpoint(zoo.network_stem(f"zoo:{name}"))  # checks the sha256
    assert card["recipe"] == entry.recipe and card["arch"] == entry.arch
    # every argument the catalogue sets (defaults added later have no say on old weights)
    assert {k: card["recipe_args"][k] for k in entry.recipe_args} == entry.recipe_args
    measured = card["zoo"]["measured"]
    assert measured["soundness_violations"] == 0
    assert measured["certified_acc"] <= measured["attack_upper_bound"] <= measured["clean_acc"]
    data = load_dataset(entry.dataset, mnist_dir)
    # fresh points (the end of the test set), the measurement's verifier and PGD
    x, y = data.x_test[-300:], data.y_test[-300:]
    result = evaluate(model, x, y, verifiers=[(entry.measure.verifier,
                                                   entry.measure.options)],
                          eps={entry.paper.norm: [entry.paper.eps]}, norms=entry.paper.norm,
                          attack=entry.measure.attack or True, progress=False)
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
def test_the_seeds_matrix_runs_on_the_committed_zoo(tmp_path, mnist_dir):
    """Provisioning finds ``zoo:`` checkpoints without training (the checkpoint folder
    stays empty) and the report puts the results beside the papers."""
    spec = load_matrix("seeds").model_copy(update={"samples": 20})
    built = [m for m in spec.models if m.checkpoint.removeprefix(zoo.PREFIX) in BUILT]
    spec = spec.model_copy(update={"models": built})
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", data_dir=mnist_dir,
                       progress=False, log=lambda _: None, executor=InlineExecutor())
    assert set(cells["status"]) == {"ok"} and not (tmp_path / "c").exists()
    table = papers_table(ResultsView.load(tmp_path / "r"))
    assert len(table) == len(cells)
    assert set(table["network"]) == {m.checkpoint.removeprefix(zoo.PREFIX) for m in built}
    markdown, _ = papers_section(ResultsView.load(tmp_path / "r"))
    no_figure = table[table["paper"].isna()]["network"]  # shown as "-" in the paper column
    assert set(no_figure) == {n for n in set(table["network"])
                              if zoo.catalog()[n].paper.value is None}
    for network in no_figure:
        assert any(line.startswith(f"| {network} ") and "| -  " in line
                   for line in markdown.splitlines())


TINY = '''
[[networks]]
name = "gloro-digits-mlp"
dataset = "digits"
arch = "mlp"
arch_args = { widths = [16] }
recipe = "gloro"
recipe_args = { eps = 0.3, epochs = 2 }
paper = { source = "a test", metric = "VRA", value = 0.5, norm = "2", eps = 0.1 }
[networks.measure]
verifier = "global-lipschitz"
options = { bound = "gloro" }
points = 60
attack = { bisection_steps = 0 }
'''


def test_a_network_is_built_found_by_name_provisioned_and_reported(tmp_path, monkeypatch):
    """`build` trains and certifies a catalogue entry into its card; a matrix names it
    `zoo:NAME` and runs without training; the report puts its results beside the paper's
    figure; a rebuild certifies again without training and keeps the training hardware."""
    from certbench.matrix import parse_matrix
    from certbench.zoo_build import build

    (tmp_path / "catalog.toml").write_text(TINY)
    monkeypatch.setattr(zoo, "CATALOG", tmp_path / "catalog.toml")
    monkeypatch.setattr(zoo, "FOLDER", tmp_path / "networks")
    card = build("gloro-digits-mlp", progress=False)
    measured = card["zoo"]["measured"]
    assert measured["points"] == 60 and measured["soundness_violations"] == 0
    assert measured["attack"] == {"bisection_steps": 0}  # the entry's PGD settings
    assert 0 < measured["certified_acc"] <= measured["attack_upper_bound"]
    assert card["zoo"]["paper"]["value"] == 0.5 and card["zoo"]["train_hardware"]
    [row] = zoo.listing()
    assert row["certbench"] == measured["certified_acc"] and row["epochs"] == 2

    spec = parse_matrix({"name": "z", "dataset": "digits", "samples": 30, "norms": ["2"],
                         "eps": [0.05, 0.1], "models": [{"name": "tiny",
                                                         "checkpoint": "zoo:gloro-digits-mlp"}],
                         "verifiers": [{"name": "global-lipschitz",
                                        "options": {"bound": "gloro"}}, {"name": "crown"}]})
    cells = run_matrix(spec, tmp_path / "r", tmp_path / "c", progress=False,
                       log=lambda _: None, executor=InlineExecutor())
    assert set(cells["status"]) == {"ok"} and not (tmp_path / "c").exists()
    view = ResultsView.load(tmp_path / "r")
    table = papers_table(view)
    assert sorted(table["verifier"]) == sorted(view.ok["shown"]) and set(table["eps"]) == {0.1}
    for row in table.itertuples():
        key = view.ok.loc[view.ok["shown"] == row.verifier, "cell_key"].item()
        assert row.certbench == view.accuracy(key)[0.1] and row.paper == 0.5

    weights = zoo.network_stem("zoo:gloro-digits-mlp").with_suffix(".safetensors")
    written = weights.stat().st_mtime_ns
    card_path = weights.with_suffix(".json")
    card_path.write_text(card_path.read_text().replace(card["zoo"]["train_hardware"],
                                                       "elsewhere"))
    again = build("gloro-digits-mlp", progress=False)
    assert weights.stat().st_mtime_ns == written and again["zoo"]["train_hardware"] == "elsewhere"
