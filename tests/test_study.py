"""The scaling study's arithmetic (draftopd.lab.study): the power-law fit, its inverse, the intervals, the report."""

from __future__ import annotations

import json
import math

import pytest

from draftopd import DraftopdError
from draftopd.lab.study import fit_power, scaling_report, tau_interval, tokens_for


def test_fit_power_recovers_a_power_law_and_inverts():
    c, b = 0.02, 0.3
    pts = [(n, 1 + c * n**b) for n in (1e4, 3e4, 1e5, 1e6)]
    fc, fb = fit_power(pts)
    assert fc == pytest.approx(c, rel=1e-9) and fb == pytest.approx(b, rel=1e-9)
    n3 = tokens_for(3.0, fc, fb)
    assert 1 + c * n3**b == pytest.approx(3.0)
    assert tokens_for(3.0, 0.5, -0.1) == math.inf  # a falling fit never reaches it
    with pytest.raises(DraftopdError):
        fit_power([(1e4, 1.5)])
    with pytest.raises(DraftopdError):
        fit_power([(1e4, 1.5), (1e4, 1.6)])


def test_tau_interval_pools_prompts_and_brackets_the_estimate():
    per_prompt = [[96, 60], [96, 40], [50, 50], [96, 48]]
    t, lo, hi = tau_interval(per_prompt)
    assert t == pytest.approx(338 / 198)
    assert lo <= t <= hi and lo < hi
    assert tau_interval([[10, 5]] * 6)[1:] == (2.0, 2.0)  # identical prompts: no spread


def test_scaling_report_writes_table_fit_and_figure(tmp_path):
    # a fake study: two kinds x three budgets, tau rising with steps on two data sets
    methods = {}
    for kind in ("dflash", "eagle3"):
        for i, steps in enumerate((10, 40, 160)):
            run = tmp_path / f"{kind}-{steps}"
            run.mkdir()
            rows = [{"step": steps, "tau": 1.1, "target_tokens": steps * 1000}]
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            methods[f"{kind} {steps}"] = {"tau": 0, "per_prompt": [[96, 80 - 10 * i - j] for j in range(8)]}
    bench = {"dtype": "float32", "threads": 2, "commit": "abc", "cpu_flags": "avx2"}
    bench["datasets"] = {ds: {"prompts": 8, "methods": methods} for ds in ("gsm8k", "mtbench")}
    (tmp_path / "tau.json").write_text(json.dumps(bench))
    md = scaling_report(tmp_path).read_text()
    assert "| 160 | 160,000 |" in md and "GSM8K test_dev" in md and "MT-bench" in md
    assert md.count("| dflash |") == 2 and "avx2" in md
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_best_chain_length_trades_reach_against_step_cost():
    from draftopd.lab.chain import best_chain_length

    # reach halves per position; a step costs 60 ms + 6 ms per drafted token; plain 50 ms
    reach = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]
    best, speed = best_chain_length(reach, {2: 72.0, 6: 96.0}, 50.0)
    expect = {n: (1 + sum(reach[:n])) * 50 / (60 + 6 * n) for n in range(1, 7)}
    assert speed == pytest.approx(expect)
    assert best == max(expect, key=expect.get) == 2
    # a free draft step: the longest chain wins; a single measured cost is taken as flat
    assert best_chain_length(reach, {4: 60.0}, 50.0)[0] == 6
    with pytest.raises(ValueError):
        best_chain_length(reach, {}, 50.0)
