"""The lab's own helpers (that the core never imports the lab: ``tests/test_imports.py``)."""

from __future__ import annotations

from pathlib import Path

from draftopd.config import DemoConfig
from draftopd.demo import STAGES
from draftopd.recipes import load

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_demo_estimate_guesses_every_stage():
    from draftopd.lab.estimate import demo_estimate

    quick = demo_estimate(load(DemoConfig, CONFIGS / "demo-quick.yaml"))
    full = demo_estimate(load(DemoConfig, CONFIGS / "demo.yaml"))
    assert set(quick) == set(full) == set(STAGES)
    assert all(v > 0 for v in quick.values()) and sum(full.values()) > sum(quick.values())
