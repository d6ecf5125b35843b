"""The import graph of certbench (docs/architecture.md, "Parts and floors"): no cycle,
imports go down the floors (or stay inside their own part), the report never reads the
run machinery, and the verifiers never import the harness. Imports inside functions
count like the others: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = [
    {"errors", "provenance", "atomic", "verifiers"},
    {"data", "models", "store", "zoo"},
    {"io", "training"},
    {"matrix"},
    {"run"},
    {"vnncomp", "report"},
    {"api"},
    {"zoo_build"},
    {"cli", "__init__"},  # __init__: certbench.evaluate, imported on first use
]
FLOOR = {part: number for number, parts in enumerate(FLOORS) for part in parts}


def module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "verifiers"):
        parts = ["certbench", "verifiers", *path.relative_to(ROOT / "verifiers").parts]
    else:
        parts = ["certbench", *path.relative_to(ROOT / "bench").parts]
    parts[-1] = parts[-1].removesuffix(".py")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for folder in ("bench", "verifiers")
           for p in sorted((ROOT / folder).rglob("*.py"))}


def part(module: str) -> str:
    """The part a module belongs to: its first name under ``certbench``."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def imports(module: str) -> set[str]:
    """The certbench modules that ``module`` imports (``from P import M`` counts as P.M
    when M is a module, else as P), relative imports resolved."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != module)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_the_graph_is_read():
    assert "certbench.run.runner" in GRAPH
    assert "certbench.run.executors" in GRAPH["certbench.run.runner"]
    assert all(part(m) in FLOOR for m in MODULES), sorted({part(m) for m in MODULES} - set(FLOOR))


def test_no_import_cycle():
    """Depth-first search; a back edge is a cycle, reported with its members."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_floors(module):
    here = part(module)
    for target in GRAPH[module]:
        there = part(target)
        assert there == here or FLOOR[there] < FLOOR[here], \
            f"{module} (floor {FLOOR[here]}) imports {target} (floor {FLOOR[there]})"
        if here == "report":
            assert there not in ("run", "vnncomp"), \
                f"{module} imports {target}: the report reads results through the store"
        if here == "verifiers":
            assert there == "verifiers", f"{module} imports the harness ({target})"
