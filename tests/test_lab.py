"""The lab stays outside the core: no module the verbs import imports ``draftopd.lab``; the lab's own helpers."""

from __future__ import annotations

import ast
from pathlib import Path

from draftopd.config import DemoConfig, load
from draftopd.demo import STAGES

SRC = Path(__file__).resolve().parents[1] / "src" / "draftopd"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def imported(path: Path) -> set[str]:
    """Every module a file imports (at any depth of the file: lazy imports in functions count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def test_the_core_never_imports_the_lab():
    core = [p for p in SRC.rglob("*.py") if "lab" not in p.relative_to(SRC).parts]
    assert len(core) > 20
    for path in core:
        bad = {n for n in imported(path) if n == "draftopd.lab" or n.startswith("draftopd.lab.")}
        assert not bad, (path, bad)


def test_training_does_not_draw():
    """Training writes metrics; figures are the report's (draftopd.report), drawn from metrics.jsonl."""
    for path in (SRC / "train").glob("*.py"):
        assert not any(n.startswith("draftopd.report") or "matplotlib" in n for n in imported(path)), path


def test_demo_estimate_guesses_every_stage():
    from draftopd.lab.estimate import demo_estimate

    quick = demo_estimate(load(DemoConfig, CONFIGS / "demo-quick.yaml"))
    full = demo_estimate(load(DemoConfig, CONFIGS / "demo.yaml"))
    assert set(quick) == set(full) == set(STAGES)
    assert all(v > 0 for v in quick.values()) and sum(full.values()) > sum(quick.values())
