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
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """The ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports read by type checkers only)."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return hidden


def imports(path: Path, modules: set[str], run_time: bool = False) -> set[str]:
    """The draftopd modules ``path`` imports (``from pkg import name`` counts as pkg.name when that is a module);
    ``run_time``: leave out the imports under ``if TYPE_CHECKING:``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    hidden = type_checking_nodes(tree) if run_time else set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def graph(run_time: bool = False) -> dict[str, set[str]]:
    files = sorted((SRC / "draftopd").rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules, run_time) for f in files}


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


def reachable(g: dict[str, set[str]], root: str) -> set[str]:
    """Every module ``root`` imports, directly or through others (``root`` included)."""
    seen, todo = set(), [root]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g[m]
    return seen


def core() -> set[str]:
    """The core package: every module the console script's verbs import (the CLI imports each verb's module)."""
    return reachable(graph(), "draftopd.cli")


def test_the_walk_sees_function_level_imports_and_finds_a_planted_circle():
    g = graph()
    assert "draftopd.train.sft" in g["draftopd.cli"]  # cli imports its verbs inside functions
    assert "draftopd.models.io" in g["draftopd.train.scaffold"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_decoding_never_imports_models_at_run_time():
    """The loop is below the drafters and the target: they come in as arguments, and ``decoding/`` names them only
    for type checkers (``if TYPE_CHECKING:``); the walk sees those and leaves them out of the run-time graph."""
    g, full = graph(run_time=True), graph()
    assert "draftopd.models.target" in full["draftopd.decoding.loop"]  # the type hint: seen by the full walk
    up = {m: sorted(d for d in deps if d.startswith("draftopd.models")) for m, deps in g.items()}
    bad = {m: d for m, d in up.items() if m.startswith("draftopd.decoding") and d}
    assert not bad, f"decoding/ imports models/ at run time: {bad}"


def test_no_import_circles():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("group", PEERS, ids=lambda g: "|".join(m.rpartition(".")[2] for m in g))
def test_no_module_imports_a_peer(group):
    g = graph()
    for m in group:
        assert m in g, f"{m} no longer exists: update PEERS"
        assert not g[m] & set(group), f"{m} imports its peer(s) {sorted(g[m] & set(group))}"


def test_bench_layers():
    """The bench's modules stand in layers, a lower one never importing a higher one: curve (verify cost by width,
    budget choice), budget (the cached ``tree_budget: auto`` choice), cost (step costs, tables), run (the timed
    runs, ``--costs`` included)."""
    g = graph()
    layers = ["draftopd.bench.curve", "draftopd.bench.budget", "draftopd.bench.cost", "draftopd.bench.run"]
    for i, low in enumerate(layers):
        assert low in g, f"{low} no longer exists: update the layers"
        above = set(layers[i + 1 :])
        assert not reachable(g, low) & above, f"{low} imports {sorted(reachable(g, low) & above)}"


def test_the_core_never_imports_the_lab():
    """``draftopd.lab`` (scaling study, study report, time guesses) is research code: nothing outside it imports it."""
    g = graph()
    assert "draftopd.lab.study" in g and "draftopd.demo" in core()
    outside = {m: deps for m, deps in g.items() if not m.startswith("draftopd.lab")}
    bad = {m: sorted(d for d in deps if d.startswith("draftopd.lab")) for m, deps in outside.items()}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_training_writes_metrics_and_does_not_draw():
    """Figures are the report's (``draftopd.report``, drawn from metrics.jsonl), never the trainers'."""
    g = graph()
    for trainer in ("draftopd.train.sft", "draftopd.train.opd"):
        assert "draftopd.report" not in reachable(g, trainer), trainer


def test_no_test_module_imports_another():
    """Tests share through ``helpers.py`` (functions) and ``conftest.py`` (fixtures), never through each other."""
    here = Path(__file__).resolve().parent
    tests = {p.stem for p in here.glob("test_*.py")}
    for path in sorted(here.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found.add(node.module or "")
        assert not found & tests, f"{path.name} imports {sorted(found & tests)}"
        assert "conftest" not in found, f"{path.name} imports conftest (shared functions live in helpers.py)"
