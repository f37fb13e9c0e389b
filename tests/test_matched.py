"""The matched-data test's verdict (lab/matched.py): each rule of docs/figure4-rules.md on synthetic held-out results
built to meet it, or to miss it by one condition."""

from __future__ import annotations

import pytest

from draftopd.lab import matched

PROMPTS = 64


def sets(tau_in: float, tau_out: float) -> dict[str, list]:
    """Per-prompt [tokens, verify steps] with these pooled taus (96 tokens a prompt, a little spread per prompt)."""

    def pp(t: float, n: int) -> list:
        return [[96, max(1, round(96 / (t * (1 + 0.04 * ((i % 5) - 2) / 2))))] for i in range(n)]

    inn, out = pp(tau_in, PROMPTS), pp(tau_out, 2 * PROMPTS)
    return {"in": inn, "out": out, "all": inn + out}


def result(curves: dict[str, dict[int, tuple[float, float]]]) -> dict:
    """``{arm: {epoch: (tau in, tau out)}}`` for both seeds, plus N at (2.0, 2.0)."""
    res = {"N": sets(2.0, 2.0)}
    for arm, points in curves.items():
        for k in matched.SEEDS:
            for e, (a, b) in points.items():
                res[matched.name(arm, k, e)] = sets(a, b)
    return res


def test_from_bench_pools_in_and_out_of_domain():
    per = {"gsm8k": [[96, 48]], "humaneval": [[96, 64]], "mtbench": [[96, 32]]}
    bench = {"datasets": {ds: {"methods": {"O s0 e1": {"per_prompt": pp}}} for ds, pp in per.items()}}
    r = matched.from_bench([bench])["O s0 e1"]
    assert r["in"] == [[96, 48]] and r["out"] == [[96, 64], [96, 32]] and len(r["all"]) == 3


def test_rule1_reproduces_when_o_beats_a_flat_s_in_both_seeds():
    res = result({"S": {1: (2.2, 2.0), 3: (2.21, 2.0)}, "O": {1: (2.2, 2.0), 3: (2.5, 2.2)}})
    v = matched.verdict(res, {"O": 100.0, "S": 30.0})
    assert v["rule1"]["holds"] and v["rule1"]["arm"] == "O" and v["verdict"] == "reproduces the on-policy claim"
    assert v["recommendation"]["arm"] == "O"
    # S still rising (epoch 3 over 1 >= +1%): not reproduced, whatever O does
    rising = result({"S": {1: (2.1, 2.0), 3: (2.21, 2.0)}, "O": {1: (2.2, 2.0), 3: (2.5, 2.2)}})
    assert not matched.rule1(rising)["holds"]
    # O below S out of domain in both seeds: not reproduced either
    ood = result({"S": {1: (2.2, 2.1), 3: (2.21, 2.1)}, "O": {1: (2.2, 2.0), 3: (3.2, 2.0)}})
    assert matched.rule1(ood)["beats_S_by_5pct_both_seeds"] and not matched.rule1(ood)["holds"]


def test_o25_stands_in_only_with_both_seeds():
    curves = {"S": {1: (2.2, 2.0), 3: (2.21, 2.0)}, "O": {1: (2.2, 2.0), 3: (2.25, 2.0)}}
    res = result(curves | {"O-25": {1: (2.2, 2.0), 3: (2.5, 2.2)}})
    assert matched.rule1(res)["arm"] == "O-25" and matched.rule1(res)["holds"]
    res.pop(matched.name("O-25", 1, 3))  # one seed only: O must carry the claim itself
    assert matched.rule1(res)["arm"] == "O" and not matched.rule1(res)["holds"]


def test_rules_2_and_3_together_when_sft_gets_what_opd_gets_in_domain():
    res = result({"S": {1: (2.25, 2.0), 3: (2.3, 2.01)}, "O": {1: (2.25, 2.0), 3: (2.3, 2.0)}})
    v = matched.verdict(res, {})
    assert not v["rule1"]["holds"] and v["rule2"]["holds"] and v["rule3"]["holds"]
    assert v["verdict"] == "refutes it at this scale; supports the domain explanation"


def test_anything_else_is_inconclusive():
    # O over S by ~3.5% (between the +2% of rule 2 and the +5% of rule 1), both up out of domain too
    res = result({"S": {1: (2.2, 2.1), 3: (2.2, 2.1)}, "O": {1: (2.2, 2.1), 3: (2.28, 2.17)}})
    v = matched.verdict(res, {})
    assert not any(v[r]["holds"] for r in ("rule1", "rule2", "rule3")) and v["verdict"] == "inconclusive"
    assert matched.verdict({"N": res["N"]}, {}) == {"verdict": "incomplete", "missing": ["O", "S"]}


def test_recommendation_takes_the_cheaper_of_two_tied_arms():
    res = result({"S": {3: (2.3, 2.0)}, "O": {3: (2.3, 2.0)}, "O-rej": {3: (2.0, 1.9)}})
    rec = matched.recommend(res, {"O": 400.0, "S": 120.0, "O-rej": 300.0})
    assert rec["arm"] == "S" and sorted(rec["tie"]) == ["O", "S"]
    res[matched.name("O", 0, 3)] = sets(2.6, 2.2)
    res[matched.name("O", 1, 3)] = sets(2.6, 2.2)
    rec = matched.recommend(res, {"O": 400.0, "S": 120.0})
    assert rec["arm"] == "O" and "tie" not in rec and rec["lead"][1] > 0
    assert rec["scores"]["O"] == pytest.approx(matched.tau(sets(2.6, 2.2)["all"]))
