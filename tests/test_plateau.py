"""scripts/plateau.py's decisions, without training: the extension run's config (20% more steps at the run's last
learning rate, from its final weights) and the declared rule's verdict on a curve and two held-out results."""

from __future__ import annotations

import pytest

from helpers import script_module


@pytest.fixture(scope="module")
def plateau():
    yield from script_module("plateau")


def test_the_extension_continues_the_run_at_its_last_learning_rate(plateau, tmp_path):
    from draftopd.config import SFTConfig
    from draftopd.recipes import load

    base = load(SFTConfig, plateau.RECIPES / "sft-dflash.yaml")
    run = plateau.run_config(base, tmp_path / "run", 600, 14400.0, plateau.FULL)
    assert run.loop.max_steps == 600 and run.loop.eval_every == 50 and run.loop.max_cpu_seconds == 14400.0
    ext = plateau.extension_config(run, tmp_path / "ext", plateau.FULL)
    assert ext.init_from == str(tmp_path / "run" / "final") and ext.out == str(tmp_path / "ext")
    assert ext.loop.max_steps == 120 and ext.loop.warmup_ratio == 0.0 and ext.loop.min_lr_ratio == 1.0
    assert ext.loop.lr == pytest.approx(run.loop.lr * run.loop.min_lr_ratio)  # where the run's cosine ended
    assert ext.arch == run.arch and ext.data == run.data


def test_the_rule_needs_a_flat_curve_and_an_extension_that_gains_under_one_percent(plateau):
    taus = [1.0, 1.4, 1.7, 1.9, 2.0, 2.05, 2.1, 2.12, 2.13, 2.12, 2.14, 2.13]
    flat = list(zip(range(0, 1200, 100), taus, strict=True))
    rising = flat[:-4] + [(800, 2.0), (900, 2.06), (1000, 2.12), (1100, 2.2)]
    same = [[100, 50]] * 8  # per prompt: tokens, verify steps (tau 2.0)
    better = [[100, 49]] * 8  # +2.0%
    ok = plateau.verdict(flat, same, [[100, 50]] * 7 + [[100, 49]])  # +0.25%
    assert ok["a_flat"] and 0 < ok["b_extension_gain"] < 0.01 and ok["plateaued"]
    assert not plateau.verdict(flat, same, better)["plateaued"]  # (b) fails: the longer run still gains 2%
    assert not plateau.verdict(rising, same, same)["plateaued"]  # (a) fails: the last 4 span 10%


def test_best_arm_is_the_ab_winner_with_an_interval_above_zero(plateau, tmp_path):
    import json

    def row(g):
        return {"gain_over_plain": {"all": g}}

    rows = {"plain": row([0, 0, 0]), "text": row([0.2, 0.1, 0.3]), "soft": row([0.04, 0.01, 0.07]),
            "auf": row([0.06, -0.01, 0.12]), "init": row([0.02, 0.005, 0.04])}  # fmt: skip
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"dflash": rows}))
    assert plateau.best_arm(report, "dflash")[0] == "soft"  # auf's interval includes 0; text is not a recipe
    rows["soft"] = rows["init"] = row([0.03, -0.01, 0.07])
    report.write_text(json.dumps({"dflash": rows}))
    assert plateau.best_arm(report, "dflash")[0] == "plain"
    with pytest.raises(SystemExit, match="no A/B result for eagle3"):
        plateau.best_arm(report, "eagle3")
