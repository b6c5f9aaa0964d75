"""The calibrate stages import each other one way only: each module imports alone, in any order,
and the graph of imports between the package's modules has no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _module_names(package: str) -> list[str]:
    folder = ROOT.joinpath(*package.split("."))
    return sorted(
        package if path.stem == "__init__" else f"{package}.{path.stem}" for path in folder.glob("*.py")
    )


def _path(module: str) -> Path:
    package = ROOT.joinpath(*module.split("."), "__init__.py")
    return package if package.is_file() else ROOT.joinpath(*module.split(".")).with_suffix(".py")


def _imported_modules(module: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` names in any import statement (lazy ones in
    functions and TYPE_CHECKING blocks included): an import back is a cycle wherever it sits."""
    path = _path(module)
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            stem = ".".join([*base, *([node.module] if node.module else [])])
            names = [stem, *(f"{stem}.{alias.name}" for alias in node.names)]  # `from . import x`
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


@pytest.mark.parametrize("package", ["conflayers_export.calibrate"])
def test_no_module_imports_one_that_imports_it_back(package):
    modules = set(_module_names(package))
    # The package's __init__ re-exports its modules; they never import the package itself.
    graph = {m: _imported_modules(m, modules) for m in modules if m != package}
    assert all(package not in targets for targets in graph.values()), graph
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


_IMPORT_EACH_ALONE = """
import importlib, sys
modules = sys.argv[1:]
def forget():  # third-party packages stay loaded; ours are imported afresh
    for name in [n for n in sys.modules if n.split(".")[0] == "conflayers_export"]:
        del sys.modules[name]
for first in modules:
    forget()
    importlib.import_module(first)
    for other in reversed(modules):
        importlib.import_module(other)
"""


def test_each_calibrate_module_imports_alone_and_in_any_order():
    """A fresh interpreter imports each module first (the others after it, in reverse order)."""
    modules = _module_names("conflayers_export.calibrate")
    assert "conflayers_export.calibrate.settings" in modules
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_ALONE, *modules], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
