"""scripts/ab_warmstart.py's parts that decide what runs and what is reported, without training: pool B refused,
steps sized from a calibration's CPU-seconds, the arms' configs, the report's rows from finished results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import script_module


@pytest.fixture(scope="module")
def ab():
    yield from script_module("ab_warmstart")


def data_folder(path: Path, sources: list[str]) -> Path:
    path.mkdir(parents=True)
    (path / "shard_00000.pt").write_bytes(b"")
    (path / "manifest.json").write_text(json.dumps({"settings": {}, "config": {"sources": sources}}))
    return path


def test_pool_b_is_never_sft_data(ab, tmp_path):
    data_folder(tmp_path / "A" / "mbpp", ["mbpp"])
    data_folder(tmp_path / "A" / "gsm8k_a", ["gsm8k_a"])
    assert [f.name for f in ab.check_pool(tmp_path / "A")] == ["gsm8k_a", "mbpp"]
    data_folder(tmp_path / "A" / "extra", ["sharegpt", "gsm8k_b"])
    with pytest.raises(SystemExit, match="pool B"):
        ab.check_pool(tmp_path / "A")
    with pytest.raises(SystemExit, match="not generated"):
        ab.check_pool(tmp_path / "no-pool")


def test_steps_come_from_the_calibrations_cpu_seconds(ab, tmp_path):
    rows = [{"step": 0, "tau": 1.0}] + [{"step": s, "loss": 1.0, "cpu_seconds": 30.0 + 2.0 * s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_step, features = ab.step_cost(tmp_path)
    assert (per_step, features) == (2.0, 30.0)
    assert ab.steps_for(100.0, per_step) == 50  # the budget counts steps: the pool's feature pass is shared
    assert ab.steps_for(1.0, per_step) == 1
    assert ab.spent(tmp_path) == 36.0


def test_each_arm_changes_one_thing_and_is_sized_to_its_budget(ab, tmp_path):
    from draftopd.config import SFTConfig
    from draftopd.recipes import load

    base = load(SFTConfig, ab.RECIPES / "sft-eagle3.yaml")
    arms = {arm: ab.override(base, **over) for arm, (_, over) in ab.ARMS.items()}
    assert arms["init"].arch.init_from_target and not base.arch.init_from_target
    assert arms["soft"].sft_loss == "soft" and arms["auf"].accept_until_fail and arms["plain"] == base
    sized = ab.sized(base, 80, 500.0, ab.QUICK)
    assert (sized.loop.max_steps, sized.loop.max_cpu_seconds, sized.loop.eval_every) == (80, 500.0, 10)
    assert sized.arch == base.arch and sized.loop.lr == base.loop.lr  # the recipe otherwise


def test_the_report_rows(ab, tmp_path):
    """Per arm: the trainer's CPU-seconds summed over its runs (the text arm's two) less the pool's shared feature
    pass, the processes' from the done
    markers, held-out tau and the paired gain over plain, and the plateau verdict of its curve."""
    home = tmp_path
    datasets = {}
    for ds in ab.DATASETS:
        methods = {}
        for i, arm in enumerate(ab.ARMS):
            per_prompt = [[20, 10 - (i if arm != "plain" else 0) + k % 2] for k in range(6)]
            tau = sum(t for t, _ in per_prompt) / sum(s for _, s in per_prompt)
            methods[arm] = {"tau": tau, "per_prompt": per_prompt}
        datasets[ds] = {"methods": methods}
    (home / "tau-dflash.json").write_text(json.dumps({"datasets": datasets}))
    (home / "done").mkdir()
    for run in ("plain-dflash", "text-pre-dflash", "text-dflash", "init-dflash", "soft-dflash", "auf-dflash"):
        (home / run).mkdir()
        taus = [1.5, 2.0, 2.0, 2.01, 1.99] if run == "plain-dflash" else [1.2, 1.5, 1.8, 2.0, 2.2]
        start = 0.0 if run == "text-pre-dflash" else 50.0  # runs on the pool start at its shared feature pass's cost
        rows = [{"step": 10 * j, "tau": t, "cpu_seconds": start + 100.0 * j} for j, t in enumerate(taus)]
        (home / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (home / "done" / f"{run}.json").write_text(json.dumps({"config": "{}", "seconds": 1, "cpu_seconds": 450.0}))
    (home / "features-dflash").mkdir()  # the pool's feature pass: 50 CPU-s before its calibration's 1st step
    cal = [{"step": s, "loss": 1.0, "cpu_seconds": 50.0 + 2.0 * s} for s in (1, 2, 3)]
    (home / "features-dflash" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cal))
    out = ab.report(home)
    rows = out["dflash"]
    assert rows["plain"]["plateaued"] and not rows["soft"]["plateaued"]
    assert rows["text"]["cpu_seconds_trainer"] == 800.0 and rows["text"]["cpu_seconds_processes"] == 900.0
    assert rows["text"]["steps"] == [40, 40] and rows["plain"]["steps"] == [40]
    assert rows["plain"]["gain_over_plain"]["all"][0] == 0.0 and rows["soft"]["gain_over_plain"]["all"][0] > 0
    md = (home / "report.md").read_text()
    assert "| soft | soft labels" in md and "eagle3" not in md  # a kind without results is left out
    assert json.loads((home / "report.json").read_text())["dflash"]["auf"]["tau"]["all"] > 2.0
