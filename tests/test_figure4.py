"""scripts/figure4.py's decisions, without training: the arms' configs (what each changes, the same rows and loop
for every arm of a seed) and O-25's rejected-stream weight from O's logged stream sums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import script_module


@pytest.fixture(scope="module")
def f4():
    yield from script_module("figure4")


def start_run(f4, path: Path) -> Path:
    """A finished SFT run folder as scripts/plateau.py leaves it: run_config.json, checkpoints/latest."""
    from draftopd.config import SFTConfig
    from draftopd.recipes import load, to_dict

    cfg = load(SFTConfig, f4.CONF / "sft-dflash.yaml", ["sft_loss=soft", "batch_size=8"])
    (path / "checkpoints" / "step_000900").mkdir(parents=True)
    (path / "checkpoints" / "latest").write_text("step_000900")
    (path / "run_config.json").write_text(json.dumps(to_dict(cfg)))
    return path


def test_every_arm_changes_one_thing_on_the_same_rows(f4, tmp_path):
    start = start_run(f4, tmp_path / "start")
    arms = f4.arm_configs(tmp_path / "home", start, tmp_path / "B", f4.FULL, None)
    assert set(arms) == {"O-s0", "O-s1", "S-s0", "S-s1", "O-rej-s0", "S-paper-s0"}  # O-25 waits for O's epoch 1
    o, s = arms["O-s0"][1], arms["S-s0"][1]
    assert arms["O-s0"][0] == ["train", "opd"] and arms["S-s0"][0] == ["train", "sft"]
    assert o.init_from == str(start / "final") and s.init_from == str(start / "checkpoints" / "step_000900")
    assert o.rollout_batch * o.accum == s.batch_size == 16 and o.loop == s.loop  # rows, seed, lr, schedule
    assert o.loop.max_steps == 375 and o.loop.keep_every == 125 and o.loop.lr == 3e-4 and o.max_new_tokens == 384
    assert s.sft_loss == "hard_ce" and s.data == o.data == str(tmp_path / "B")  # S is hard CE whatever the start's
    assert arms["O-s1"][1].loop.seed == arms["S-s1"][1].loop.seed == 1
    assert arms["O-rej-s0"][1].rej_weight == 0.0 and o.rej_weight == 1.0
    paper = arms["S-paper-s0"][1]
    assert paper.loop.lr == 6e-4 and paper.init_from == str(start / "final")  # a fresh AdamW
    with_25 = f4.arm_configs(tmp_path / "home", start, tmp_path / "B", f4.FULL, 0.08)
    assert with_25["O-25-s0"][1].rej_weight == 0.08
    verb, bench = f4.tau_stage(tmp_path / "home", "O-rej-s0", f4.FULL)
    assert list(bench.methods) == ["O-rej s0 e1", "O-rej s0 e2", "O-rej s0 e3"]
    assert bench.methods["O-rej s0 e3"].path.endswith("O-rej-s0/checkpoints/step_000375") and bench.limit == 64


def test_o25_weight_makes_the_rejected_stream_a_quarter_of_the_loss(f4, tmp_path):
    rows = [{"step": s, "loss": 1.0, "resp_loss_sum": 30.0, "rej_loss_sum": 40.0} for s in (1, 2, 3)]
    rows.insert(1, {"step": 1, "tau": 1.5})  # tau rows carry no stream sums
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert f4.rej_weight_for_25pct(tmp_path, 4) is None  # the epoch has not ended
    lam = f4.rej_weight_for_25pct(tmp_path, 3)
    assert lam * 40 / (30 + lam * 40) == pytest.approx(0.25, abs=1e-4)
