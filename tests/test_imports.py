"""The package's modules import each other one way: no import cycle, type hints included.

delta.py <-> vector_delta.py and optim/base.py <-> optim/graphed.py were cycles through type-only imports; the
probing of a forward now lives below both (edgezo/zo/probing.py) and graphed.py describes the optimizer it
needs (graphed.Updater). Imports inside functions count: deferring an import hides a cycle, it does not end it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"edgezo": ROOT / "edgezo", "edgezo.cli": ROOT / "cli"}  # cli/ is installed as edgezo.cli


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package by its __init__.py)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *parts[:-1], *[p for p in parts[-1:] if p != "__init__"]))] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def imports(name: str, path: Path, known: dict[str, Path], type_hints: bool) -> set[str]:
    """The package modules `name` imports, at module level or in a function; `if TYPE_CHECKING:` blocks only
    with `type_hints`. `from a import b` names the module a.b where there is one, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child) and not type_hints:
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*up, base] if base else up)
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found = {"edgezo.cli" + m[3:] if m == "cli" or m.startswith("cli.") else m for m in found}  # a checkout's cli
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := dfs(n))), None)


@pytest.mark.parametrize("type_hints", [False, True], ids=["runtime", "with-type-hints"])
def test_the_package_has_no_import_cycle(type_hints):
    known = modules()
    graph = {name: imports(name, path, known, type_hints) for name, path in known.items()}
    assert graph["edgezo.delta"] >= {"edgezo.vector_delta"} and "edgezo.optim.graphed" in graph["edgezo.optim.base"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
