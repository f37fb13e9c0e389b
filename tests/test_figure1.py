"""scripts/figure1.py's done markers: a stage finished by an older version (flat loop keys, a bench's methods as
name=folder strings) counts as finished when its config is the same; a machine's thread count does not matter."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "figure1.py"


@pytest.fixture(scope="module")
def figure1():
    spec = importlib.util.spec_from_file_location("figure1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _marker(tmp_path: Path, config: dict) -> Path:
    done = tmp_path / "done.json"
    done.write_text(json.dumps({"config": json.dumps(config, sort_keys=True, default=str), "seconds": 1.0}))
    return done


def _old_layout(figure1, cfg) -> dict:
    """The record an older version wrote of ``cfg``: loop keys at the top level, bench methods as strings."""
    d = figure1.to_dict(cfg)
    if "loop" in d:
        d = {**{k: v for k, v in d.items() if k != "loop"}, **d["loop"]}
    if isinstance(d.get("methods"), dict):
        shared = next(iter(d["methods"].values()))
        d["drafter"] = {**shared, "kind": "pld", "path": None}
        d["drafter"].pop("arch")  # a field added since
        d["methods"] = [f"{name}={m['path']}" for name, m in d["methods"].items()]
    return d


@pytest.mark.parametrize("stage", ["opd-dflash", "cont-eagle3", "tau-dflash"])
def test_an_old_marker_of_the_same_config_is_finished(figure1, tmp_path, stage):
    _, cfg = figure1.configs(tmp_path)[stage]
    done = _marker(tmp_path, _old_layout(figure1, cfg))
    assert figure1.finished_config(done, type(cfg)) == figure1.recorded(cfg)
    other = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, threads=1))  # the machine's, not the run's
    assert figure1.finished_config(done, type(cfg)) == figure1.recorded(other)
    if stage.startswith("tau"):
        changed = dataclasses.replace(cfg, limit=cfg.limit + 1)
    else:
        changed = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, max_steps=cfg.loop.max_steps + 1))
    assert figure1.finished_config(done, type(cfg)) != figure1.recorded(changed)


def test_a_marker_this_version_cannot_read_is_not_finished(figure1, tmp_path):
    _, cfg = figure1.configs(tmp_path)["tau-dflash"]
    done = _marker(tmp_path, {**figure1.to_dict(cfg), "no_such_key": 1})
    assert figure1.finished_config(done, type(cfg)) is None


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_each_ablation_changes_one_part_of_the_kinds_recipe(figure1, tmp_path, kind):
    """No ablation repeats the OPD run (EAGLE-3's recipe has no rejected stream: its ablation adds one)."""
    stages = figure1.configs(tmp_path)
    base = figure1.to_dict(stages[f"opd-{kind}"][1])
    runs = {n: c for n, (verb, c) in figure1.ablation_stages(tmp_path, kind, stages).items() if verb[0] == "train"}
    assert len(runs) == 3
    for name, cfg in runs.items():
        d = figure1.to_dict(cfg)
        assert len({k for k in d if d[k] != base[k]} - {"out"}) == 1, name
    rejected = "no-rejected" if kind == "dflash" else "with-rejected"
    assert f"{rejected}-{kind}" in runs
