"""The demo's report from made-up stage outputs: its tables carry the numbers of the results, its figures exist;
``python -m draftopd.report`` draws tau against the step from a run's metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from draftopd.config import DrafterConfig
from draftopd.demo import demo_methods
from draftopd.recipes import to_dict
from draftopd.report import learned_setting, tree_rows, write_report

SETS = ("gsm8k", "mtbench")
# per method: tau, speed-up over plain, seconds and target calls (the step cost), per-prompt [tokens, verify steps]
METHODS = {
    "plain": (1.0, 1.0, 10.0, 100),
    "prompt lookup": (1.6, 1.5, 7.0, 62),
    "SFT": (1.5, 1.2, 9.0, 67),
    "Draft-OPD": (1.65, 1.35, 8.0, 61),
    "SFT continued": (1.55, 1.25, 8.5, 65),
}


def method(tau: float, speedup: float, seconds: float, calls: int) -> dict:
    steps = round(100 / tau)
    return {
        "tau": tau,
        "tokens_per_s": 20 * speedup,
        "speedup": speedup,
        "lossless": 1.0,
        "new_tokens": 100,
        "seconds": seconds,
        "target_calls": calls,
        "tau_histogram": {"1": steps // 2, "2": steps - steps // 2},
        "per_prompt": [[50, steps // 2], [50, steps - steps // 2]],
    }


def bench_result(tau_only: bool = False) -> dict:
    names = ("SFT", "Draft-OPD", "SFT continued") if tau_only else tuple(METHODS)
    setting = {"confidence": 0.0 if tau_only else 0.5, "chain_length": 6}  # the demo's, for its trained drafters
    return {
        "dtype": "float32",
        "threads": 2,
        "commit": "abc1234",
        "cpu_flags": "avx2",
        "config": {
            "target": {"path": "default"},
            "sampling": {"temperature": 0.0, "max_new_tokens": 96},
            "drafter": None,
            "methods": {m: {"kind": "path", **setting} for m in names if m != "plain"},
            "tau_only": tau_only,
        },
        "datasets": {ds: {"prompts": 2, "methods": {m: method(*METHODS[m]) for m in names}} for ds in SETS},
    }


def metrics(folder: Path, rows: list[tuple[int, float, int]]) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "tau": t, "target_tokens": n}) for s, t, n in rows]
    (folder / "metrics.jsonl").write_text("\n".join([*lines, json.dumps({"step": 9, "loss": 1.0})]) + "\n")
    return folder


def test_report_tables_carry_the_results(tmp_path):
    for stage, result in (("bench", bench_result()), ("tau", bench_result(tau_only=True))):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "result.json").write_text(json.dumps(result))
    metrics(tmp_path / "sft", [(0, 1.1, 0), (10, 1.4, 2000)])
    metrics(tmp_path / "opd", [(0, 1.4, 0), (3, 1.5, 600)])
    metrics(tmp_path / "sft_continued", [(0, 1.4, 0), (3, 1.45, 500)])
    stages = {"data": {"seconds": 60.0, "command": "draftopd data"}, "sft": {"seconds": 120.0, "command": "x"}}
    text = write_report(tmp_path, stages).read_text()
    for ds in SETS:
        assert f"| {ds} | 1.500 | 1.650 | +10.0% | [" in text  # OPD vs SFT on the bench's prompts
        assert f"| {ds} | SFT | 1.20 | 0.80 |" in text and f"| {ds} | Draft-OPD | 1.35 | 0.90 |" in text
        assert f"| {ds} | prompt lookup | 1.50 | 1.00 |" in text
        assert f"| {ds} | 1.500 | 1.550 | 1.650 | +" in text  # the tau stage: SFT, SFT continued, Draft-OPD
    # step cost: (9 s / 67 calls) / (10 s / 100 calls)
    assert f"| SFT | {(9 / 67) / (10 / 100):.2f} |" in text and f"| Draft-OPD | {(8 / 61) / 0.1:.2f} |" in text
    # training tau, first and last evaluation; OPD's target tokens continue from SFT's
    assert "| SFT | 2 | 1.100 | 1.400 | 2,000 |" in text and "| Draft-OPD | 2 | 1.400 | 1.500 | 2,600 |" in text
    assert "| drafter.confidence | 0.5 |" in text and "float32" in text and "abc1234" in text
    assert "| drafter.chain_length | 6 |" in text and "drafter.confidence 0.0\n" in text  # the tau stage's
    assert "| data | 1.0 min | `draftopd data` |" in text and "Total 3.0 min" in text
    for fig in ("tau_vs_compute", "tau_vs_step", "acceptance_histogram", "tokens_per_s"):
        assert (tmp_path / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"(figures/{fig}.png)" in text


def test_the_report_reads_the_drafter_setting_of_old_results_too():
    """A result written while methods were name=folder strings kept the drafters' setting in ``drafter``."""
    old = {"drafter": {"confidence": 0.5, "chain_length": 4}, "methods": ["SFT=runs/sft/final"]}
    assert learned_setting(old) == {"confidence": 0.5, "chain_length": 4}
    assert learned_setting({"methods": {"SFT": {"confidence": 0.0}}, "drafter": None}) == {"confidence": 0.0}


def test_the_demo_benches_its_drafters_as_chains_and_as_trees_and_the_report_names_the_tree():
    tree = DrafterConfig(kind="path", path="x", tree_budget=16, tree_topk=4, lookup=True)
    methods = demo_methods(tree, Path("runs/demo"), pld=True)
    assert list(methods) == ["prompt lookup", "SFT", "Draft-OPD", "SFT continued", "SFT tree", "Draft-OPD tree"]
    assert methods["prompt lookup"].kind == "pld" and not methods["prompt lookup"].lookup
    chains = [methods[n] for n in ("SFT", "Draft-OPD", "SFT continued")]
    assert all(m.kind == "path" and m.tree_budget == 0 and not m.lookup for m in chains)
    assert methods["Draft-OPD tree"] == replace(tree, kind="path", path=str(Path("runs/demo/opd/final")))
    assert list(demo_methods(DrafterConfig(), Path("x"))) == ["SFT", "Draft-OPD", "SFT continued"]  # chains only
    cfg = {"methods": {n: to_dict(m) for n, m in methods.items()}}
    cfg["methods"]["Draft-OPD tree"]["tree_budget"] = 8  # `auto` resolves per drafter: each row its own budget
    assert tree_rows(cfg) == [
        "| `SFT tree` decodes draft trees | tree_budget 16, tree_topk 4, prompt lookup branch |",
        "| `Draft-OPD tree` decodes draft trees | tree_budget 8, tree_topk 4, prompt lookup branch |",
    ]
    assert tree_rows({"methods": {"SFT": {}}}) == [] and tree_rows({"methods": ["SFT=x"]}) == []


@pytest.mark.slow
def test_tau_vs_step_is_drawn_from_metrics(tmp_path):
    run = metrics(tmp_path / "run", [(0, 1.1, 0), (5, 1.3, 100)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "ta')  # a run writing (or killed mid-append): the torn row is left out
    png = tmp_path / "tau.png"
    done = subprocess.run(
        [sys.executable, "-m", "draftopd.report", str(png), str(run)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(png) and png.read_bytes()[:4] == b"\x89PNG"
