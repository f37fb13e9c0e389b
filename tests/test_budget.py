"""Tree budgets from measurements: tau measured by budget in ``bench --costs``, and ``tree_budget: auto`` resolved
from a cached choice (or a quick measurement) keyed by machine, target, dtype and drafter. On the tiny target."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from draftopd import DraftopdError
from draftopd.bench import budget
from draftopd.bench.budget import cache_path, digest, key_fields, read_choice, resolve_budget, why
from draftopd.bench.cost import format_costs
from draftopd.bench.curve import choose_budget, measure_tau, measured_choice
from draftopd.bench.run import run_bench, run_costs
from draftopd.config import BenchConfig, DrafterConfig, GenerateConfig
from draftopd.models.io import build_drafter
from draftopd.models.target import load_target
from draftopd.recipes import load

EAGLE = {"kind": "shape", "arch": {"kind": "eagle3", "draft_vocab_size": 64}, "confidence": 0}


@pytest.fixture(scope="module")
def target(tiny):
    return load_target(str(tiny), "fp32")


def bench_config(tiny, *overrides: str) -> BenchConfig:
    small = ["target.dtype=fp32", "datasets=[gsm8k]", "limit=2", "sampling.max_new_tokens=10", "hf_baseline=false"]
    return load(BenchConfig, None, [f"target.path={tiny}", *small, "warmup=0", *overrides])


def methods(**named: dict) -> str:
    return "methods=" + yaml.safe_dump(named, default_flow_style=True, sort_keys=False, width=1 << 20).strip()


def test_tree_budget_takes_a_number_or_auto():
    assert load(GenerateConfig, None, ["drafter.kind=path", "drafter.path=x", "drafter.tree_budget=auto"]).drafter
    assert load(GenerateConfig, None, ["drafter.tree_budget=8"]).drafter.tree_budget == 8
    for bad in ("autox", "-1", "true"):
        with pytest.raises(DraftopdError, match="tree_budget"):
            load(GenerateConfig, None, [f"drafter.tree_budget={bad}"])


def test_choose_budget_weighs_a_measured_chain_at_its_own_width():
    """Budget 0 measured (a tree drafter's chain) is the chain, at its measured width, not plain decoding."""
    cost = {1: 10.0, 4: 12.0, 8: 16.0, 16: 30.0}
    budget, table = choose_budget(cost, {0: 2.0, 3: 2.1, 7: 2.6}, {0: 4.0})  # the chain verifies 4 tokens
    assert [r["budget"] for r in table] == [0, 3, 7] and table[0]["tau"] == 2.0 and table[0]["ms"] == 12.0
    assert budget == 3  # 2.1 / 12 beats the chain's 2.0 / 12 (same width), 2.6 / 16 and plain's 1 / 10
    assert table[1]["vs_plain"] == pytest.approx(2.1 / 12 * 10)
    # a gated chain that verifies 2 tokens on average costs 10.67 ms: 2.0 / 10.67 beats the tree of 3
    assert choose_budget(cost, {0: 2.0, 3: 2.1, 7: 2.6}, {0: 2.0})[0] == 0
    # a measured width past the curve is refused by choose_budget and left out by measured_choice
    with pytest.raises(DraftopdError, match="outside"):
        choose_budget(cost, {0: 2.0, 20: 3.0}, {20: 24.0})
    choice = measured_choice(cost, {0: (2.0, 4.0), 7: (2.6, 8.0), 20: (9.0, 24.0)})
    assert [r["budget"] for r in choice["table"]] == [0, 7] and choice["tau_source"].startswith("measured")
    assert choice["zero"] == "chain" and choice["table"][0]["tau"] == 2.0
    past = measured_choice(cost, {0: (2.0, 20.0), 7: (2.6, 8.0)})  # the chain itself past the curve: 0 is plain
    assert past["zero"] == "plain" and past["table"][0]["tau"] == 1.0 and past["table"][0]["width"] == 1.0
    assert why(choice).startswith(f"tree_budget {choice['budget']}: tau ")


def test_measure_tau_runs_each_budget_and_reports_its_width(target):
    """A chain of 3 verifies at most 4 tokens a step, a tree of 5 at most 6 (fewer where the token budget ends)."""
    prompts = [target.encode_chat("What is 2 + 3?"), target.encode_chat("Name a colour.")]
    got = measure_tau(target, load_drafter(EAGLE, chain_length=3), prompts, 12, (0, 5))
    assert list(got) == [0, 5]
    (chain_tau, chain_w), (tree_tau, tree_w) = got[0], got[5]
    assert 1 <= chain_tau <= 4 and 1 <= tree_tau <= 4  # a tree of depth 3: at most 3 accepted + 1
    assert 1 < chain_w <= 4 < tree_w <= 6


def load_drafter(section: dict, **more) -> DrafterConfig:
    """A drafter section as a recipe would give it."""
    return load(GenerateConfig, None, ["drafter=" + json.dumps({**section, **more})]).drafter


def test_the_cache_key_names_everything_the_choice_depends_on(target, drafter, tmp_path):
    d = load_drafter({"kind": "path", "path": str(drafter)}, tree_budget="auto")
    fields = key_fields(d, target)
    assert fields["dtype"] == "float32" and fields["threads"] == torch.get_num_threads() and fields["machine"]
    assert key_fields(dataclasses.replace(d, tree_budget=8), target) == fields  # the budget is what is chosen
    path = cache_path(fields, tmp_path)
    assert path.parent == tmp_path / "budgets" and cache_path(dict(fields), tmp_path) == path
    for name, other in [
        ("target", "another"),
        ("dtype", "bfloat16"),
        ("threads", fields["threads"] + 1),
        ("machine", "another cpu"),
        ("drafter", "another"),
        ("settings", {**fields["settings"], "tree_topk": 2}),
    ]:
        assert cache_path({**fields, name: other}, tmp_path) != path, name
    assert key_fields(dataclasses.replace(d, tree_topk=2), target)["settings"]["tree_topk"] == 2
    # the drafter's files: a changed weight changes the key
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in drafter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert digest(copy) == digest(drafter)
    weights = next(f for f in copy.iterdir() if f.suffix == ".safetensors")
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    assert digest(copy) != digest(drafter)


def fake_choice(budget_: int) -> dict:
    row = {"tau": 2.0, "width": budget_ + 1.0, "ms": 10.0, "tok_per_ms": 0.2, "vs_plain": 1.5, "interpolated": False}
    return {"budget": budget_, "tau_source": "measured: fake", "table": [{"budget": budget_, **row}]}


def test_auto_is_measured_once_then_read_from_its_cache(target, drafter, tmp_path, caplog):
    calls = []

    def measure(d, t):
        calls.append(d.tree_budget)
        return fake_choice(6)

    d = load_drafter({"kind": "path", "path": str(drafter)}, tree_budget="auto")
    with caplog.at_level("INFO"):
        assert resolve_budget(d, target, measure, tmp_path).tree_budget == 6
    assert (
        calls == ["auto"] and "tree_budget auto, measured" in caplog.text and "tree_budget 6: tau 2.00" in caplog.text
    )
    (path,) = (tmp_path / "budgets").iterdir()
    stored = json.loads(path.read_text())
    assert (
        stored["budget"] == 6 and stored["key"] == key_fields(d, target) and stored["why"].startswith("tree_budget 6")
    )
    assert resolve_budget(d, target, measure, tmp_path) == dataclasses.replace(d, tree_budget=6)
    assert calls == ["auto"]  # read from the cache, not measured again
    # another setting is another key: measured again
    assert resolve_budget(dataclasses.replace(d, tree_topk=2), target, measure, tmp_path).tree_budget == 6
    assert len(calls) == 2 and len(list((tmp_path / "budgets").iterdir())) == 2
    path.write_text("{not json")  # a damaged choice: measured again, and overwritten
    assert read_choice(path) is None and resolve_budget(d, target, measure, tmp_path).tree_budget == 6
    assert len(calls) == 3 and read_choice(path)["budget"] == 6
    # a set budget, or a drafter without trees: nothing to measure
    assert resolve_budget(dataclasses.replace(d, tree_budget=3), target, measure, tmp_path).tree_budget == 3
    assert resolve_budget(DrafterConfig(kind="pld", tree_budget="auto"), target, measure, tmp_path).tree_budget == 0
    assert len(calls) == 3
    with pytest.raises(DraftopdError, match="auto"):
        build_drafter(d, target)  # the runner resolves it first


def test_a_bench_with_auto_measures_caches_and_stays_lossless(tiny, drafter, target, tmp_path, monkeypatch):
    """End to end on the tiny target: `auto` measured quickly (the real measurer), cached under $DRAFTOPD_HOME,
    decoded at the chosen budget (the result's config says which), lossless; a second bench reads the cache."""
    monkeypatch.setenv("DRAFTOPD_HOME", str(tmp_path))
    monkeypatch.setattr(budget, "QUICK_TOKENS", 8)
    seen = []  # the quick tau prompts: the last 3 of each set, never the first ones a bench reads

    def measure(t, d, prompts, *rest):
        seen.extend(prompts)
        return measure_tau(t, d, prompts, *rest)

    monkeypatch.setattr(budget, "measure_tau", measure)
    cfg = bench_config(tiny, methods(auto={"kind": "path", "path": str(drafter), "tree_budget": "auto"}))
    result = run_bench(cfg, target, progress=False)
    (path,) = (tmp_path / "budgets").iterdir()
    chosen = json.loads(path.read_text())["budget"]
    assert chosen in budget.QUICK.budgets
    last = [target.encode_chat(p) for name in budget.QUICK_SETS for p in budget.quick_prompts(name)]
    assert len(last) >= 3  # GSM8K ships; HumanEval and MT-bench where set up ($DRAFTOPD_HOME is empty here)
    assert seen == last and not set(map(tuple, last)) & {
        tuple(target.encode_chat(p)) for p in budget.load_prompts("gsm8k", 2)
    }
    assert result["config"]["methods"]["auto"]["tree_budget"] == chosen
    assert all(m["lossless"] == 1.0 for m in result["datasets"]["gsm8k"]["methods"].values())

    def no_measuring(*_):
        raise AssertionError("measured again")

    monkeypatch.setattr(budget, "quick_choice", no_measuring)
    again = run_bench(cfg, target, progress=False)
    assert again["config"]["methods"]["auto"]["tree_budget"] == chosen


def test_costs_measure_tau_by_budget_for_a_tree_drafter(tiny, drafter, target, tmp_path, monkeypatch):
    """--costs: the folder drafter's tau measured at each budget (0: its chain) and its choice cached for `auto`;
    prompt lookup's still estimated from its chain acceptance; the table says which is which."""
    monkeypatch.setenv("DRAFTOPD_HOME", str(tmp_path))
    curve = ("cost_curve.widths=[1, 2, 4, 8]", "cost_curve.context=16", "cost_curve.reps=1")
    cfg = bench_config(
        tiny,
        "limit=1",
        "lossless_prompts=0",
        *curve,
        "cost_curve.budgets=[0, 2, 4, 16]",
        "cost_curve.tau_prompts=1",
        methods(lookup={"kind": "pld"}, tree={"kind": "path", "path": str(drafter)}),
    )
    result = run_costs(cfg, target, progress=False)
    choices = result["budgets"]["float32"]
    assert choices["lookup"]["tau_source"].startswith("estimate")
    tree = choices["tree"]
    assert tree["tau_source"].startswith("measured")
    assert [r["budget"] for r in tree["table"]] == [0, 2, 4]  # 16 nodes verify 17 tokens: past the curve
    assert tree["table"][0]["width"] <= 4  # the DFlash chain of block 4: at most 3 drafts and the root
    assert [r["width"] for r in tree["table"][1:]] == pytest.approx([3.0, 5.0], abs=0.5)
    cached = read_choice(cache_path(key_fields(cfg.methods["tree"], target)))
    assert cached is not None and cached["budget"] == tree["budget"] and tree["cached"]
    table = format_costs(result)
    assert "Node budget for tree, float32" in table and "| tau (measured) |" in table and "| tau (estimate) |" in table
    assert "0 (chain)" in table and "0 (plain)" in table and "Cached for tree_budget auto" in table
