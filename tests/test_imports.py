"""The package's import graph, read from the source (nothing imported): no circles, and no module imports a peer.

Every ``import``/``from ... import`` of a ``draftopd`` module counts, at the top of a file or inside a function
(a function-level import only hides a circle until that function runs). Peers are modules that stand side by side
(two trainers, two drafters, two benchmarks): what they share lives in a module below them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PEERS = [  # modules that must not import one another
    ("draftopd.train.sft", "draftopd.train.opd"),
    ("draftopd.models.dflash", "draftopd.models.eagle3", "draftopd.models.pld"),
    ("draftopd.bench.run", "draftopd.bench.cost"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The draftopd modules ``path`` imports (``from pkg import name`` counts as pkg.name when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    files = sorted((SRC / "draftopd").rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules) for f in files}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``g`` as a path that ends where it starts, or None (depth-first, three colours)."""
    colour = dict.fromkeys(g, 0)  # 0 unvisited, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if colour[n] == 1:
                return [*stack[stack.index(n) :], n]
            if colour[n] == 0 and (cycle := visit(n)):
                return cycle
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(g):
        if colour[m] == 0 and (cycle := visit(m)):
            return cycle
    return None


def test_the_walk_sees_function_level_imports_and_finds_a_planted_circle():
    g = graph()
    assert "draftopd.train.sft" in g["draftopd.cli"]  # cli imports its verbs inside functions
    assert "draftopd.models.io" in g["draftopd.train.common"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("group", PEERS, ids=lambda g: "|".join(m.rpartition(".")[2] for m in g))
def test_no_module_imports_a_peer(group):
    g = graph()
    for m in group:
        assert m in g, f"{m} no longer exists: update PEERS"
        assert not g[m] & set(group), f"{m} imports its peer(s) {sorted(g[m] & set(group))}"
