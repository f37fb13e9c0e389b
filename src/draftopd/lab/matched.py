"""Issue 37's verdict: the rules of ``docs/figure4-rules.md`` (committed at 171b466, before any arm ran) applied to
the held-out results of the matched-data test (``scripts/figure4.py``), as pure functions of per-prompt results.

A result here is ``{name: {set: per_prompt}}``: ``name`` is ``"N"`` (the start) or ``"ARM sSEED eEPOCH"`` (e.g.
``"O s0 e3"``), ``set`` is ``in`` (GSM8K test_dev), ``out`` (HumanEval and MT-bench, pooled) or ``all`` (the three),
and ``per_prompt`` is a bench's list of ``[tokens committed, verify steps]`` per prompt (greedy: every drafter
commits the same tokens on a prompt, so prompts pair). ``from_bench`` builds it from ``draftopd bench`` JSONs.

The gain of X over Y on a set is ``bench.run.paired_gain(Y, X)``: tau(X) / tau(Y) - 1 and its 95% bootstrap interval
over prompts (2,000 resamples, seed 0); seed k of one arm pairs with seed k of another; an epoch-less gain is at
epoch 3. The rules, as the file words them (``rule1`` .. ``recommend`` quote each condition beside its code):
1. reproduces the on-policy claim; 2. refutes it at this scale; 3. supports the domain explanation; 4. anything else
is inconclusive (2 and 3 may hold together; 1 excludes both); 5. the recommended recipe.
"""

from __future__ import annotations

from draftopd.bench.run import paired_gain

IN, OUT = ("gsm8k",), ("humaneval", "mtbench")
SEEDS = (0, 1)
EPOCHS = (1, 2, 3)
ARMS = ("O", "O-rej", "O-25", "S", "S-paper")  # the arms rule 5 chooses among (N is the start, S-more has no rule)


def name(arm: str, seed: int, epoch: int) -> str:
    return f"{arm} s{seed} e{epoch}"


def from_bench(results: list[dict]) -> dict[str, dict[str, list]]:
    """``{name: {in, out, all: per_prompt}}`` from ``draftopd bench --json`` results (tau-only, the three sets),
    their method names being the names above."""
    out: dict[str, dict[str, list]] = {}
    for r in results:
        ds = r["datasets"]
        for method in ds[IN[0]]["methods"]:
            pp = {d: ds[d]["methods"][method]["per_prompt"] for d in (*IN, *OUT)}
            out[method] = {
                "in": sum((pp[d] for d in IN), []),
                "out": sum((pp[d] for d in OUT), []),
                "all": sum((pp[d] for d in (*IN, *OUT)), []),
            }
    return out


def tau(per_prompt: list) -> float:
    return sum(t for t, _ in per_prompt) / max(1, sum(s for _, s in per_prompt))


def gain(res: dict, base: str, other: str, where: str = "all") -> tuple[float, float, float]:
    """The gain of ``other`` over ``base`` on set ``where``, with its interval."""
    return paired_gain(res[base][where], res[other][where])


def has(res: dict, arm: str, epochs=EPOCHS, seeds=SEEDS) -> bool:
    return all(name(arm, k, e) in res for k in seeds for e in epochs)


def growth(res: dict, arm: str) -> float:
    """Mean over the seeds of the arm's pooled tau, epoch 3 over epoch 1, minus 1."""
    return sum(tau(res[name(arm, k, 3)]["all"]) / tau(res[name(arm, k, 1)]["all"]) - 1 for k in SEEDS) / len(SEEDS)


def rule1(res: dict) -> dict:
    """Reproduces the on-policy claim, with O, or O-25 standing in (only if run with both seeds and meeting the
    first condition in both)."""

    def beats_s(arm: str) -> bool:
        # pooled gain of the arm over S >= +5% with the interval's lower end > 0, in seed 0 and in seed 1
        return all((g := gain(res, name("S", k, 3), name(arm, k, 3)))[0] >= 0.05 and g[1] > 0 for k in SEEDS)

    arm = "O" if beats_s("O") or not has(res, "O-25", (3,)) or not beats_s("O-25") else "O-25"
    first = beats_s(arm)
    # out-of-domain gain of that arm over S >= 0 (point estimate) in both seeds
    ood = all(gain(res, name("S", k, 3), name(arm, k, 3), "out")[0] >= 0 for k in SEEDS)
    # S flattens while O keeps rising: mean over the two seeds of S's pooled tau, epoch 3 over epoch 1, gains < +1%,
    # and O's (the arm's) gains >= +2%
    s_growth, o_growth = growth(res, "S"), growth(res, arm)
    return {
        "arm": arm,
        "beats_S_by_5pct_both_seeds": first,
        "ood_gain_over_S_nonnegative_both_seeds": ood,
        "S_growth_e1_to_e3": s_growth,
        "arm_growth_e1_to_e3": o_growth,
        "holds": first and ood and s_growth < 0.01 and o_growth >= 0.02,
    }


def rule2(res: dict) -> dict:
    """Refutes the claim at this scale."""
    # pooled gain of O over S <= +2% (within +-2%, or negative) in seed 0 and in seed 1
    small = all(gain(res, name("S", k, 3), name("O", k, 3))[0] <= 0.02 for k in SEEDS)
    # in domain, S's gain over N is at least half of O's gain over N (mean over the two seeds)
    s_in = sum(gain(res, "N", name("S", k, 3), "in")[0] for k in SEEDS) / len(SEEDS)
    o_in = sum(gain(res, "N", name("O", k, 3), "in")[0] for k in SEEDS) / len(SEEDS)
    return {
        "O_over_S_at_most_2pct_both_seeds": small,
        "S_over_N_in_domain": s_in,
        "O_over_N_in_domain": o_in,
        "holds": small and s_in >= 0.5 * o_in,
    }


def rule3(res: dict) -> dict:
    """Supports the domain explanation."""

    def clearly_up(arm: str, k: int) -> bool:  # in domain, over N >= +2% with the interval's lower end > 0
        g = gain(res, "N", name(arm, k, 3), "in")
        return g[0] >= 0.02 and g[1] > 0

    up = all(clearly_up(arm, k) for arm in ("S", "O") for k in SEEDS)
    # out of domain, S over N and O over N are both within +-2% (each seed)
    flat_out = all(abs(gain(res, "N", name(arm, k, 3), "out")[0]) <= 0.02 for arm in ("S", "O") for k in SEEDS)
    # pooled gain of O over S within +-2% (each seed)
    tie = all(abs(gain(res, name("S", k, 3), name("O", k, 3))[0]) <= 0.02 for k in SEEDS)
    return {"in_domain_up_both": up, "out_of_domain_flat": flat_out, "O_ties_S": tie, "holds": up and flat_out and tie}


def recommend(res: dict, cpu_per_epoch: dict[str, float]) -> dict:
    """Rule 5: the arm with the highest pooled tau at epoch 3 (mean over its seeds) among O, O-rej, O-25, S and
    S-paper; where its lead over the runner-up has an interval that includes 0 (seed 0 paired), the cheaper of the two
    (less CPU-time per epoch) is recommended and the tie is said."""
    scores = {}
    for arm in ARMS:
        seeds = [k for k in SEEDS if name(arm, k, 3) in res]
        if seeds:
            scores[arm] = sum(tau(res[name(arm, k, 3)]["all"]) for k in seeds) / len(seeds)
    if not scores:
        return {"arm": None, "why": "no arm has reached epoch 3"}
    ranked = sorted(scores, key=scores.get, reverse=True)
    if len(ranked) == 1:
        return {"arm": ranked[0], "scores": scores, "why": "the only arm at epoch 3"}
    lead, second = ranked[:2]
    g = gain(res, name(second, 0, 3), name(lead, 0, 3))
    if g[1] > 0:
        return {"arm": lead, "scores": scores, "lead": g, "why": f"{lead} leads {second}, interval above 0"}
    cheaper = min((lead, second), key=lambda a: cpu_per_epoch.get(a, float("inf")))
    return {
        "arm": cheaper,
        "scores": scores,
        "lead": g,
        "tie": [lead, second],
        "why": f"{lead} and {second} tie (the lead's interval includes 0): {cheaper} costs less per epoch",
    }


def verdict(res: dict, cpu_per_epoch: dict[str, float]) -> dict:
    """Rules 1-5 on a complete result (N, and O and S with both seeds at epochs 1 and 3)."""
    missing = [a for a in ("O", "S") if not has(res, a, (1, 3))] + ([] if "N" in res else ["N"])
    if missing:
        return {"verdict": "incomplete", "missing": missing}
    r1, r2, r3 = rule1(res), rule2(res), rule3(res)
    if r1["holds"]:
        said = ["reproduces the on-policy claim"]
    else:
        said = [
            s for s, r in (("refutes it at this scale", r2), ("supports the domain explanation", r3)) if r["holds"]
        ]
    return {
        "rule1": r1,
        "rule2": r2,
        "rule3": r3,
        "verdict": "; ".join(said) if said else "inconclusive",
        "recommendation": recommend(res, cpu_per_epoch),
    }
