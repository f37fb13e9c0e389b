"""The benchmark: one loop (``run_methods``) under the timed and the tau-only bench, methods as named drafters with
their own settings, and the step-cost table as a recipe of it. In process, on the tiny target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from draftopd import DraftopdError
from draftopd.bench import run
from draftopd.bench.cost import cost_dtypes, format_costs, step_costs, tau_from_chain
from draftopd.bench.curve import choose_budget, tree_attention, tree_mask, width_costs
from draftopd.bench.run import TAU_KEYS, build_methods, format_table, lossless_columns, run_bench, run_costs
from draftopd.config import BenchConfig
from draftopd.decoding import loop
from draftopd.models.target import load_target
from draftopd.recipes import load

RECIPES = Path(__file__).resolve().parent.parent / "configs"
EAGLE = {"kind": "shape", "arch": {"kind": "eagle3", "draft_vocab_size": 64}}  # untrained, a 64-token vocabulary


@pytest.fixture(scope="module")
def target(tiny):
    return load_target(str(tiny), "fp32")


def bench_config(tiny: Path, *overrides: str, recipe: Path | None = None) -> BenchConfig:
    """A small greedy fp32 bench of the tiny target on GSM8K prompts (the suite's fixture copy)."""
    small = ["target.dtype=fp32", "datasets=[gsm8k]", "limit=2", "sampling.max_new_tokens=10", "hf_baseline=false"]
    return load(BenchConfig, recipe, [f"target.path={tiny}", *small, "warmup=0", *overrides])


def methods(**named: dict) -> str:
    """A ``methods=`` override: the named drafter sections as one line of YAML."""
    return "methods=" + yaml.safe_dump(named, default_flow_style=True, sort_keys=False, width=1 << 20).strip()


def test_each_method_decodes_with_its_own_settings(tiny, drafter, target):
    cfg = bench_config(
        tiny,
        methods(
            short={**EAGLE, "chain_length": 2, "confidence": 0},
            long={**EAGLE, "chain_length": 5, "confidence": 0},
            gated={**EAGLE, "chain_length": 5, "confidence": 0.9},
            folder={"kind": "path", "path": str(drafter), "confidence": 0.3},
        ),
    )
    built = build_methods(cfg, target)
    assert [built[n].chain_length for n in ("short", "long", "gated")] == [2, 5, 5]
    assert [built[n].confidence for n in ("short", "gated", "folder")] == [0.0, 0.9, 0.3]
    rows = run_bench(cfg, target, progress=False)["datasets"]["gsm8k"]["methods"]
    assert list(rows) == ["plain", "short", "long", "gated", "folder"]  # the baseline first, then the recipe's order
    # acceptance_rate has one entry per draft position proposed: whole chains ungated; an untrained drafter is
    # never sure (top-1 ~ 1/64), so at confidence 0.9 each proposal ends at its first token
    assert [len(rows[n]["acceptance_rate"]) for n in ("short", "long", "gated")] == [2, 5, 1]
    assert all(m["lossless"] == 1.0 for m in rows.values())  # greedy fp32: every method reproduces plain decoding


def test_lossless_is_checked_in_fp32_not_in_the_bench_dtype(tiny, monkeypatch):
    """A bf16 bench whose speculative text differs from bf16 plain text (made so here: every drafted generation in
    bf16 gets its last token changed, as a numerics flip would) still reads lossless 1.0: lossless is the fp32
    re-run's. The bf16 disagreement is its own column, with the index of the first difference."""
    seen = []

    def flip_in_bf16(target, prompts, drafter, *args, **kw):
        g = real(target, prompts, drafter, *args, **kw)
        seen.append(target.dtype)
        if drafter is not None and target.dtype == torch.bfloat16:
            g.tokens = [t[:-1] + [t[-1] + 1] for t in g.tokens]
        return g

    real = run.speculative_generate
    monkeypatch.setattr(run, "speculative_generate", flip_in_bf16)
    cfg = bench_config(
        tiny, "target.dtype=bf16", "limit=3", "lossless_prompts=2", methods(e={**EAGLE, "chain_length": 3})
    )
    result = run_bench(cfg, progress=False)
    r = result["datasets"]["gsm8k"]
    assert result["dtype"] == "bfloat16" and result["lossless_dtype"] == "float32" and r["lossless_prompts"] == 2
    assert seen.count(torch.float32) == 2  # the check: plain and the method on the first 2 prompts (a batch), in fp32
    e = r["methods"]["e"]
    assert e["lossless"] == 1.0 and r["methods"]["plain"]["lossless"] == 1.0
    assert e["text_agree"] == 0.0 and e["first_diff"] == 9.0  # the last of 10 tokens differs on every prompt
    table = format_table(result)
    assert "bf16 agree" in table and "0.00 @9" in table and "first 2 prompts per set" in table


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_fp32_check_catches_a_lossy_verify(tiny, monkeypatch, dtype):
    """A verify that accepts every draft (an untrained drafter's, wrong) must not read lossless: in fp32 from the
    timed run itself, in bf16 from the fp32 re-run."""

    def accept_all(draft, n_draft, logits, *args, **kw):
        return n_draft, logits[torch.arange(len(n_draft)), n_draft].argmax(-1)  # the bonus token after them all

    monkeypatch.setattr(loop, "verify", accept_all)
    cfg = bench_config(tiny, f"target.dtype={dtype}", "lossless_prompts=2", methods(e={**EAGLE, "confidence": 0}))
    r = run_bench(cfg, progress=False)["datasets"]["gsm8k"]
    assert r["methods"]["plain"]["lossless"] == 1.0 and r["methods"]["e"]["lossless"] < 1.0
    assert r["lossless_prompts"] == 2


def test_old_results_keep_their_meaning(tiny, target):
    """A result written before the fp32 check: in fp32 its 'lossless' still is, in bf16 it was the agreement."""
    result = run_bench(bench_config(tiny, methods(e={"kind": "pld"})), target, progress=False)
    for row in result["datasets"]["gsm8k"]["methods"].values():
        row["lossless"] = 0.5
        del row["text_agree"], row["first_diff"]
    del result["lossless_dtype"]
    row = result["datasets"]["gsm8k"]["methods"]["e"]
    assert lossless_columns(result, row) == (0.5, 0.5, None)
    result["dtype"] = "bfloat16"
    assert lossless_columns(result, row) == (None, 0.5, None)
    assert "an older result" in format_table(result) and "0.50" in format_table(result)


def test_timed_and_tau_only_benches_run_the_one_loop(tiny, target, monkeypatch):
    batches = []

    def spy(*args, **kw):
        batches.append(kw.get("batch_size", 1))
        return real(*args, **kw)

    real = run.run_methods
    monkeypatch.setattr(run, "run_methods", spy)
    two = methods(lookup={"kind": "pld"}, eagle={**EAGLE, "chain_length": 3, "confidence": 0})
    timed = run_bench(bench_config(tiny, two, "limit=3"), target, progress=False)
    tau = run_bench(bench_config(tiny, two, "limit=3", "tau_only=true", "batch_size=2"), target, progress=False)
    assert batches == [1, 2]  # batch 1 timed, then batched: the same function
    timed_rows, tau_rows = (r["datasets"]["gsm8k"]["methods"] for r in (timed, tau))
    assert list(tau_rows) == ["lookup", "eagle"] and all(set(m) == set(TAU_KEYS) for m in tau_rows.values())
    for name in ("lookup", "eagle"):  # greedy and deterministic: batching changes no token
        assert tau_rows[name]["per_prompt"] == timed_rows[name]["per_prompt"]
        assert tau_rows[name]["tau"] == timed_rows[name]["tau"]
    assert timed_rows["plain"]["speedup"] == 1.0 and timed_rows["eagle"]["step_ms"] > 0


def test_the_costs_recipe_gives_the_step_cost_table(tiny, target):
    small_curve = ("cost_curve.widths=[1, 2, 4]", "cost_curve.context=16", "cost_curve.reps=1")
    cfg = bench_config(tiny, "limit=1", "sampling.max_new_tokens=6", *small_curve, recipe=RECIPES / "bench-costs.yaml")
    assert cost_dtypes(cfg) == ("fp32",)  # a set dtype: that one only (auto: fp32 and bf16)
    result = run_costs(cfg, target, progress=False)
    rows = result["dtypes"]["float32"]
    assert list(rows) == ["plain", *cfg.methods]
    for label, r in rows.items():
        assert r["step_ms"] > 0 and r["draft_ms"] + r["verify_ms"] <= r["step_ms"] + 0.02, label
        if label != "plain":
            assert r["draft_ms"] > 0 and r["break_even_tau"] == pytest.approx(
                r["step_ms"] / r["plain_ms"], rel=0.02
            )  # ms rounded to 0.01
    table = format_costs(result)
    steps = table.split("\n\n")[0]  # the step-cost table, then the width curve and the budget choice
    assert steps.count("\n") == len(rows) + 1 and "| dflash block 16, draft vocab 8k | " in steps
    assert "| plain | " in table and result["runs"][0]["config"]["limit"] == 1
    curve = result["widths"]["float32"]
    assert curve["context"] == 16 and list(curve["ms"]) == ["1", "2", "4"] and min(curve["ms"].values()) > 0
    assert "| 4 | " in table and "(1.00) |" in table  # width 1 over itself
    assert list(result["budgets"]["float32"]) == ["prompt lookup"]  # the untrained shapes' acceptance says nothing
    choice = result["budgets"]["float32"]["prompt lookup"]
    assert [r["budget"] for r in choice["table"]][:2] == [0, 1] and max(r["budget"] for r in choice["table"]) <= 3
    assert f"Node budget for prompt lookup, float32: **{choice['budget']}**" in table and "estimate" in table


def test_tree_attention_sees_ancestors_only():
    # root, then nodes 0 (child of the root), 1 (child of 0), 2 (child of the root), 3 (child of 1)
    allowed, pos = tree_attention([-1, 0, -1, 1], context=3)
    assert allowed.shape == (1, 5, 8) and allowed[0, :, :3].all()  # every slot sees the whole context
    own = allowed[0, :, 3:].int().tolist()
    assert own == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 1, 1, 0, 1]]
    assert pos.tolist() == [[3, 4, 5, 4, 6]]  # context + depth


def test_a_tree_forward_scores_each_node_as_its_own_path(target):
    """The mask the width curve times is a real verify: under it each node's logits equal a causal forward of the
    context and the node's root path (so the curve times what a tree verify computes, at its width)."""
    torch.manual_seed(0)
    parents, context = [-1, 0, 0, 1, -1, 3], 5
    ids = torch.randint(target.vocab_size, (1, context + len(parents) + 1))
    cache = target.new_cache()
    seen = torch.ones(1, context, dtype=torch.bool)
    target.forward(ids[:, :context], seen.long(), torch.arange(context)[None], cache)
    cache.commit(seen)
    mask, pos = tree_mask(parents, context, target.dtype)
    tree = target.forward(ids[:, context:], mask, pos, cache).logits[0]
    for j in range(len(parents) + 1):
        path, node = [], j - 1  # the slots from the root down to slot j
        while node >= 0:
            path.insert(0, context + 1 + node)
            node = parents[node]
        seq = ids[:, [*range(context), context, *path]]
        alone = target.forward(seq, torch.ones_like(seq), torch.arange(seq.shape[1])[None], None).logits[0, -1]
        torch.testing.assert_close(tree[j], alone, rtol=1e-4, atol=1e-4)


def test_width_costs_times_every_width(target):
    ms = width_costs(target, (1, 3, 8), context=8, reps=2)
    assert list(ms) == [1, 3, 8] and all(v > 0 for v in ms.values())
    with pytest.raises(DraftopdError, match="positions"):
        width_costs(target, (1, 2), context=target.max_positions, reps=1)


def test_choose_budget_maximises_tokens_per_ms():
    cost = {1: 10.0, 2: 11.0, 4: 13.0, 8: 20.0, 16: 40.0}
    budget, table = choose_budget(cost, {1: 1.5, 3: 2.2, 7: 3.0, 15: 3.5})
    assert budget == 3  # 2.2 / 13 beats 1.5 / 11, 3.0 / 20, 3.5 / 40 and plain's 1 / 10
    assert [r["budget"] for r in table] == [0, 1, 3, 7, 15] and table[0]["tau"] == 1.0
    assert table[2]["tok_per_ms"] == pytest.approx(2.2 / 13) and table[2]["vs_plain"] == pytest.approx(2.2 / 1.3)
    assert not any(r["interpolated"] for r in table)
    # a steep curve: no budget pays, plain decoding (0) wins
    assert choose_budget({1: 10.0, 2: 30.0, 4: 60.0}, {1: 1.5, 3: 2.5})[0] == 0


def test_choose_budget_ties_and_a_flat_curve():
    tie = choose_budget({1: 10.0, 4: 15.0, 8: 30.0}, {3: 2.4, 7: 4.8})  # 0.16 tok/ms both: the smaller budget
    assert tie[0] == 3
    flat = {1: 10.0, 64: 10.0}  # every width costs the same: the most tau wins, interpolated widths
    budget, table = choose_budget(flat, {1: 1.5, 2: 1.8, 5: 2.0})
    assert budget == 5 and all(r["ms"] == 10.0 for r in table) and table[1]["interpolated"]
    assert choose_budget(flat, {5: 2.0, 9: 2.0, 20: 2.0})[0] == 5  # tau plateaus: the smallest budget reaching it
    # between measured widths the cost is linear: width 4 on 1..8 is 10 + 14 * 3 / 7
    assert choose_budget({1: 10.0, 8: 24.0}, {3: 1.1})[1][1]["ms"] == pytest.approx(16.0)


def test_choose_budget_slack_takes_the_smallest_budget_near_the_best():
    """2% apart: exact ties pick the faster (7), a 3% slack the smaller (3); past the slack the faster still wins."""
    cost = {1: 10.0, 4: 20.0, 8: 20.0}
    tau = {3: 2.94, 7: 3.0}  # 0.147 vs 0.150 tok/ms
    assert choose_budget(cost, tau)[0] == 7
    assert choose_budget(cost, tau, slack=0.03)[0] == 3
    assert choose_budget(cost, {3: 2.8, 7: 3.0}, slack=0.03)[0] == 7  # 6.7% apart


def test_choose_budget_reads_a_noisy_curve_as_never_cheaper_when_wider():
    """Medians that invert (width 16 timed below width 8, as a noisy machine gives) do not make a bigger budget free:
    with the same tau the smaller budget wins, and every row's cost is a running maximum of the curve."""
    noisy = {1: 30.0, 8: 40.0, 16: 36.0, 32: 60.0}
    budget, table = choose_budget(noisy, {7: 2.1, 15: 2.1})
    assert budget == 7
    assert [row["ms"] for row in table] == [30.0, 40.0, 40.0]  # budgets 0, 7 (width 8), 15 (width 16: 40, not 36)


def test_choose_budget_refuses_what_it_cannot_read():
    with pytest.raises(DraftopdError, match="width 1"):
        choose_budget({2: 5.0}, {1: 1.5})
    with pytest.raises(DraftopdError, match="outside the measured curve"):
        choose_budget({1: 5.0, 8: 9.0}, {15: 3.0})
    with pytest.raises(DraftopdError, match="tau"):
        choose_budget({1: 5.0, 8: 9.0}, {3: 0.5})


def test_tau_from_chain_estimates_tau_by_budget():
    # a_j: the accepted prefix reaches draft j (the loop counts draft j accepted only with d_1..d_j accepted)
    assert tau_from_chain([0.5, 0.25, 0.0]) == {1: 1.5, 2: 1.75, 3: 1.75}
    assert tau_from_chain([]) == {}


def test_step_costs_pool_the_data_sets_by_verify_steps():
    """Two data sets: per-step times are weighted by each set's verify steps (target calls less one per prompt)."""

    def row(step: float, calls: int) -> dict:
        return {"step_ms": step, "draft_ms": step / 4, "verify_ms": step / 2, "target_calls": calls}

    sets = {"a": (10.0, 20.0, 12), "b": (30.0, 60.0, 32)}  # plain ms, drafter ms, target calls over 2 prompts
    result = {"config": {"tau_only": False}, "datasets": {}}
    for ds, (plain, drafted, calls) in sets.items():
        result["datasets"][ds] = {"prompts": 2, "methods": {"plain": row(plain, calls), "d": row(drafted, calls)}}
    rows = step_costs(result)
    assert rows["plain"]["step_ms"] == (10 * 10 + 30 * 30) / 40 == 25.0
    assert rows["d"]["step_ms"] == 50.0 and rows["d"]["draft_ms"] == 12.5 and rows["d"]["break_even_tau"] == 2.0
