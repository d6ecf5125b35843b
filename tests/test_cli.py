"""Every user mistake is one line on stderr and exit code 2, and nothing is overwritten."""

from __future__ import annotations

import json

import pytest

from certbench.cli import main

GOOD = """
name = "t"
dataset = "digits"
samples = 20
eps = [0.1]
[[models]]
name = "m"
arch = "mlp"
recipe_args = { epochs = 1 }
[[verifiers]]
name = "global-lipschitz"
"""


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


BAD_MATRICES = {
    "malformed TOML": ("name = 'x\n", "not valid TOML"),
    "unknown verifier": (GOOD.replace('name = "global-lipschitz"', 'name = "nope"'),
                         "unknown verifier 'nope'"),
    "unknown architecture": (GOOD.replace('arch = "mlp"', 'arch = "vgg"'),
                             "unknown architecture 'vgg'"),
    "unknown recipe": (GOOD.replace("recipe_args", 'recipe = "magic"\nrecipe_args'),
                       "unknown recipe 'magic'"),
    "negative epsilon": (GOOD.replace("eps = [0.1]", "eps = [0.1, -0.2]"),
                         "positive number"),
    "non-numeric epsilon": (GOOD.replace("eps = [0.1]", 'eps = ["big"]'), "eps"),
    "unknown key": (GOOD.replace("samples = 20", "sampels = 20"), "sampels: unknown key"),
    "bad verifier option": (GOOD.replace('name = "global-lipschitz"',
                                         'name = "global-lipschitz"\noptions = {bound = "x"}'),
                            "bound must be 'gloro' or 'lmt'"),
    "two verifiers shown alike": (GOOD + '[[verifiers]]\nname = "global-lipschitz"\n',
                                  "already shown as 'global-lipschitz'"),
    "a label that is another verifier's name": (
        GOOD + '[[verifiers]]\nname = "local-lipschitz"\nlabel = "crown"\n',
        "'crown' is another verifier's name"),
}


@pytest.mark.parametrize("case", sorted(BAD_MATRICES))
def test_bad_matrix_is_one_line_and_exit_2(tmp_path, capsys, case):
    text, message = BAD_MATRICES[case]
    matrix = tmp_path / "m.toml"
    matrix.write_text(text)
    results = tmp_path / "results"
    results.mkdir()
    (results / "cells.parquet").write_bytes(b"earlier results")
    code, out, err = run_cli(capsys, "run", "--matrix", str(matrix), "--results", str(results),
                             "--checkpoint-dir", str(tmp_path / "c"), "--quiet")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certbench: error: ")
    assert message in lines[0]
    assert (results / "cells.parquet").read_bytes() == b"earlier results"


def test_unreadable_results_table(tmp_path, capsys):
    matrix = tmp_path / "m.toml"
    matrix.write_text(GOOD)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "cells.parquet").write_bytes(b"not parquet")
    code, _, err = run_cli(capsys, "run", "--matrix", str(matrix), "--results",
                           str(tmp_path / "r"), "--checkpoint-dir", str(tmp_path / "c"),
                           "--quiet")
    assert code == 2 and "not a readable Parquet table" in err
    assert (tmp_path / "r" / "cells.parquet").read_bytes() == b"not parquet"


def test_missing_matrix_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--matrix", str(tmp_path / "none.toml"))
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1


def test_missing_dataset_file(tmp_path, capsys):
    matrix = tmp_path / "m.toml"
    matrix.write_text(GOOD.replace('"digits"', '"mnist"'))
    code, _, err = run_cli(capsys, "run", "--matrix", str(matrix), "--data-dir",
                           str(tmp_path / "nodata"), "--results", str(tmp_path / "r"))
    assert code == 2 and "t10k-images-idx3-ubyte.gz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage", ["truncate", "pickle", "card"])
def test_bad_checkpoint_in_a_matrix(tmp_path, capsys, damage):
    code, _, _ = run_cli(capsys, "train", "--dataset", "digits", "--arch", "mlp",
                         "--arch-args", '{"widths": [8]}', "--recipe-args", '{"epochs": 1}',
                         "--out", str(tmp_path / "m"), "--quiet")
    assert code == 0
    weights, card = tmp_path / "m.safetensors", tmp_path / "m.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:50])
    elif damage == "pickle":
        weights.write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    else:
        data = json.loads(card.read_text())
        data["arch_args"] = {"widths": [9]}
        data.pop("weights_sha256")
        card.write_text(json.dumps(data))
    matrix = tmp_path / "m.toml"
    matrix.write_text(GOOD.replace('arch = "mlp"', f'checkpoint = "{tmp_path / "m"}"'))
    code, _, err = run_cli(capsys, "run", "--matrix", str(matrix), "--results",
                           str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert {"truncate": "truncated", "pickle": "pickle", "card": "do not fit"}[damage] in err


def test_bad_json_argument_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "x", "--recipe-args", "{epochs: 3}"])
    assert exc.value.code == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "run", "list", "show", "report", "compare"])
def test_every_command_has_help_with_an_example(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "example: certbench " + command in capsys.readouterr().out


def test_list_names_everything(capsys):
    code, out, _ = run_cli(capsys, "list")
    for word in ("digits", "cnn-4c3f", "resnet-tiny", "gloro", "lmt", "global-lipschitz",
                 "quick"):
        assert word in out
    assert code == 0


def test_show_prints_the_summary(tmp_path, capsys):
    matrix = tmp_path / "m.toml"
    matrix.write_text(GOOD)
    code, out, _ = run_cli(capsys, "run", "--matrix", str(matrix), "--results",
                           str(tmp_path / "r"), "--checkpoint-dir", str(tmp_path / "c"),
                           "--quiet")
    assert code == 0
    code, out, _ = run_cli(capsys, "show", str(tmp_path / "r"))
    assert code == 0 and "cert@0.1" in out and "global-lipschitz" in out and "ms/sample" in out
    assert "iqr%" in out
    code, _, err = run_cli(capsys, "show", str(tmp_path / "nothing"))
    assert code == 2 and "no results" in err


@pytest.mark.parametrize("flags, message", [
    (["--executor", "inline", "--workers", "2"], "--workers needs the process or ray"),
    (["--address", "10.0.0.1:6379"], "--address is for --executor ray"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_executor_flags_are_one_line(tmp_path, capsys, flags, message):
    matrix = tmp_path / "m.toml"
    matrix.write_text(GOOD)
    code, _, err = run_cli(capsys, "run", "--matrix", str(matrix), "--results",
                           str(tmp_path / "r"), "--checkpoint-dir", str(tmp_path / "c"),
                           "--quiet", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_run_with_workers_and_a_timeout(tmp_path, capsys):
    import pandas as pd

    matrix = tmp_path / "m.toml"
    matrix.write_text(GOOD.replace('eps = [0.1]', 'eps = [0.1]\nnorms = ["2", "inf"]'))
    code, out, _ = run_cli(capsys, "run", "--matrix", str(matrix), "--results",
                           str(tmp_path / "r"), "--checkpoint-dir", str(tmp_path / "c"),
                           "--quiet", "--workers", "2", "--timeout", "120")
    assert code == 0 and "2 cell(s) run" in out
    cells = pd.read_parquet(tmp_path / "r" / "cells.parquet")
    assert (cells["status"] == "ok").all()
    assert cells["executor"].str.startswith("process[workers=2,").all()


SMOOTHING = """
[[verifiers]]
name = "smoothing"
options = { n = 2000 }
"""


def test_with_seed_sets_every_seed_a_matrix_leaves_open():
    from certbench.matrix import parse_matrix, tomllib

    text = GOOD + SMOOTHING + """
[[models]]
name = "kept"
checkpoint = "somewhere/model"
[[verifiers]]
name = "local-lipschitz"
options = { seed = 7 }
"""
    spec = parse_matrix(tomllib.loads(text)).with_seed(3)
    assert spec.seed == 3 and [m.seed for m in spec.models] == [3, 0]  # a checkpoint: as is
    lipschitz, smoothing, local = spec.verifiers
    assert lipschitz.options == {} and lipschitz.label is None  # takes no seed
    assert smoothing.options == {"n": 2000, "seed": 3} and smoothing.label == "smoothing[n=2000]"
    assert local.options == {"seed": 7}  # set by the matrix: kept


def test_run_with_a_seed_reseeds_points_models_and_noise(tmp_path, capsys, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.toml").write_text(GOOD + SMOOTHING)
    indices = {}
    for seed in (None, 3):
        flags = [] if seed is None else ["--seed", str(seed)]
        code, out, _ = run_cli(capsys, "run", "--matrix", "m.toml", "--checkpoint-dir", "c",
                               "--quiet", "--executor", "inline", *flags)
        assert code == 0 and "smoothing[n=2000]" in out
        folder = tmp_path / "results" / ("t" if seed is None else f"t-seed{seed}")
        cells = pd.read_parquet(folder / "cells.parquet").set_index("verifier")
        assert cells.loc["smoothing[n=2000]", "options"] == (
            '{"n":2000}' if seed is None else '{"n":2000,"seed":3}')
        indices[seed] = set(pd.read_parquet(folder / "samples.parquet")["sample_index"])
    assert indices[None] != indices[3]
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2  # one model per seed
