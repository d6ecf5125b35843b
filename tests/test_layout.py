"""The layout contracts of docs/architecture.md that code can check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from certbench.verifiers import get_verifier
from certbench.verifiers.lirpa import lirpa_status

VERIFIERS = Path(__file__).resolve().parents[1] / "verifiers"


@pytest.mark.parametrize("path", sorted(VERIFIERS.rglob("*.py")), ids=lambda p: p.name)
def test_verifiers_import_nothing_of_the_harness(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("certbench"):
                assert name.startswith("certbench.verifiers"), f"{path.name} imports {name}"


@pytest.mark.skipif(lirpa_status()[0], reason="auto_LiRPA is installed here")
def test_lirpa_verifier_without_auto_lirpa_says_why_in_one_line():
    verifier = get_verifier("lirpa:crown")
    with pytest.raises(RuntimeError, match="auto_LiRPA") as exc:
        verifier.prepare(None, (1, 8, 8))
    assert "\n" not in str(exc.value)
