"""Checkpoints: safetensors plus a JSON card; anything else is refused with one clear
error, and nothing is unpickled."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from certbench.errors import UserError
from certbench.models import build_model, load_checkpoint, save_checkpoint
from conftest import DIGITS_SHAPE


def _card(arch="mlp", arch_args=None):
    return {
        "arch": arch, "arch_args": {"widths": [8]} if arch_args is None else arch_args,
        "dataset": "digits",
        "input_shape": list(DIGITS_SHAPE), "num_classes": 10,
        "normalization": {"mean": [0.3], "std": [0.4]}, "recipe": "standard",
    }


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", DIGITS_SHAPE, 10, (0.3,), (0.4,), {"widths": [8]})
    save_checkpoint(model, _card(), tmp_path / "m")
    return model, tmp_path / "m"


def test_roundtrip_keeps_the_function(saved):
    model, stem = saved
    loaded, card = load_checkpoint(stem)
    x = torch.rand(4, *DIGITS_SHAPE)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert card["weights_sha256"] and card["format"] == 1


@pytest.mark.parametrize("arch", ["cnn-small", "cnn-4c3f", "resnet-tiny"])
def test_every_architecture_roundtrips(tmp_path, arch):
    model = build_model(arch, DIGITS_SHAPE, 10, (0.3,), (0.4,), {})
    save_checkpoint(model, _card(arch, {}), tmp_path / arch)
    loaded, _ = load_checkpoint(tmp_path / f"{arch}.safetensors")
    x = torch.rand(2, *DIGITS_SHAPE)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_truncated_weights_are_refused(saved):
    _, stem = saved
    path = stem.with_suffix(".safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint(stem)


def test_changed_weights_fail_the_recorded_hash(saved, tmp_path):
    model, stem = saved
    with torch.no_grad():
        model[-1].bias.add_(1.0)
    card = json.loads(stem.with_suffix(".json").read_text())
    save_checkpoint(model, _card(), tmp_path / "other")
    stem.with_suffix(".safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    stem.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(UserError, match="does not match the sha256"):
        load_checkpoint(stem)


def test_corrupted_weights_without_a_hash_are_refused(saved):
    _, stem = saved
    card = json.loads(stem.with_suffix(".json").read_text())
    del card["weights_sha256"]
    stem.with_suffix(".json").write_text(json.dumps(card))
    path = stem.with_suffix(".safetensors")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(UserError, match="corrupted or truncated"):
        load_checkpoint(stem)


def test_card_that_does_not_match_the_weights_is_refused(saved):
    _, stem = saved
    card = json.loads(stem.with_suffix(".json").read_text())
    card["arch_args"] = {"widths": [16]}
    del card["weights_sha256"]
    stem.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(UserError, match="do not fit the card"):
        load_checkpoint(stem)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_pickle_carrying_code_is_refused_without_running_it(tmp_path, capsys, writer):
    path = tmp_path / "evil.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(_Payload(), protocol=4))
    else:
        torch.save({"state_dict": _Payload()}, path)
    (tmp_path / "evil.json").write_text(json.dumps(_card()))
    with pytest.raises(UserError, match="pickle"):
        load_checkpoint(tmp_path / "evil")
    assert "pickled code ran" not in capsys.readouterr().out


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(UserError, match="nothere.safetensors not found"):
        load_checkpoint(tmp_path / "nothere")
