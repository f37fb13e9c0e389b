"""The quick demo end to end on the real default target (what CI runs), then a re-run and a resumed stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from draftopd import assets
from draftopd.bench.run import paired_gain
from draftopd.config import DemoConfig
from draftopd.demo import STAGES, run_demo
from draftopd.models.target import resolve_dtype
from draftopd.recipes import load

pytestmark = pytest.mark.slow

QUICK = Path(__file__).resolve().parents[1] / "configs" / "demo-quick.yaml"
# the bench stage's methods: plain, prompt lookup, the three drafters as chains, SFT and Draft-OPD as trees
BENCHED = {"plain", "prompt lookup", "SFT", "Draft-OPD", "SFT continued", "SFT tree", "Draft-OPD tree"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    if not (assets.default_target_dir() / "config.json").exists():
        pytest.skip("default target not set up (run scripts/setup.sh)")
    out = tmp_path_factory.mktemp("demo")
    # the shipped quick demo made smaller still (CI's time: the pipeline is what is tested here, not its numbers)
    smaller = ["data.limit_per_source=4", "sft.loop.max_steps=10", "sft.eval.max_new_tokens=12",
               "bench.datasets=[gsm8k]", "bench.sampling.max_new_tokens=12",
               "tau.sampling.max_new_tokens=12"]  # fmt: skip
    cfg = load(DemoConfig, QUICK, [f"out={out}", *smaller])
    said: list[str] = []
    report = run_demo(cfg, say=said.append)
    return cfg, out, report, said


def test_quick_demo_writes_report_with_every_method(quick_demo):
    cfg, out, report, said = quick_demo
    text = report.read_text()
    result = json.loads((out / "bench" / "result.json").read_text())
    assert set(result["datasets"]) == set(cfg.bench.datasets)  # the tau stage below runs all three sets
    for ds, r in result["datasets"].items():
        assert set(r["methods"]) == BENCHED
        for name, m in r["methods"].items():
            # greedy, checked in fp32 in any bench dtype: every drafter reproduces plain decoding
            assert m["lossless"] == 1.0, (ds, name)
            if result["dtype"] != "float32":  # bf16 numerics differ across block widths: their own column, explained
                assert 0 <= m["text_agree"] <= 1 and "bf16 agree: share of all prompts" in text
            assert m["new_tokens"] > 0
            assert f"{ds:<10} {name[:14]:<14}" in text
            assert len(m["per_prompt"]) == r["prompts"]
            if name != "plain":  # its speed-up over plain decoding and over prompt lookup
                vs = m["speedup"] / r["methods"]["prompt lookup"]["speedup"]
                assert f"| {ds} | {name} | {m['speedup']:.2f} | {vs:.2f} |" in text, (ds, name)
        sft, opd = r["methods"]["SFT"]["tau"], r["methods"]["Draft-OPD"]["tau"]
        assert f"| {ds} | {sft:.3f} | {opd:.3f} | {100 * (opd / sft - 1):+.1f}% | [" in text  # with its interval
    assert result["dtype"] in text and result["commit"] in text  # the report says which dtype and code ran
    # the bench drafts with the default gate, the tau stage without: the report gives both settings
    assert {m["confidence"] for m in result["config"]["methods"].values()} == {0.5}
    assert "| drafter.confidence | 0.5 |" in text
    # SFT and Draft-OPD also decode as draft trees with prompt lookup's branch (demo-quick.yaml's bench.drafter)
    trees = [result["config"]["methods"][n] for n in ("SFT tree", "Draft-OPD tree")]
    keys = ("tree_budget", "tree_topk", "lookup", "lookup_switch")
    assert all(tuple(m[k] for k in keys) == (8, 4, True, True) for m in trees)
    assert result["config"]["methods"]["SFT"]["tree_budget"] == 0 and not result["config"]["methods"]["SFT"]["lookup"]
    for name in ("SFT tree", "Draft-OPD tree"):
        assert (
            f"| `{name}` decodes draft trees | tree_budget 8, tree_topk 4, prompt lookup branch "
            "(switched: lookup alone on rounds where it measured faster) |" in text
        )
    # the tau stage: the three drafters on the same prompts, OPD's paired gains over its control and the start
    tau = json.loads((out / "tau" / "result.json").read_text())
    assert tau["config"]["tau_only"] is True and {m["confidence"] for m in tau["config"]["methods"].values()} == {0}
    assert "drafter.confidence 0.0\n" in text
    assert set(tau["datasets"]) == {"gsm8k", "humaneval", "mtbench"}
    for ds, r in tau["datasets"].items():
        assert set(r["methods"]) == {"SFT", "Draft-OPD", "SFT continued"}
        assert all(len(m["per_prompt"]) == r["prompts"] == cfg.tau.limit for m in r["methods"].values())
        taus = " | ".join(f"{r['methods'][k]['tau']:.3f}" for k in ("SFT", "SFT continued", "Draft-OPD"))
        g, lo, hi = paired_gain(r["methods"]["SFT continued"]["per_prompt"], r["methods"]["Draft-OPD"]["per_prompt"])
        assert f"| {ds} | {taus} | {100 * g:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}] |" in text, ds
    for fig in ("tau_vs_compute", "tau_vs_step", "acceptance_histogram", "tokens_per_s"):
        assert (out / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    for stage in STAGES:
        assert (out / "done" / f"{stage}.json").exists()
        assert (out / "logs" / f"{stage}.log").stat().st_size > 0
    # the OPD and SFT-continued runs start from the SFT drafter and log tau from step 0
    opd_rows = [json.loads(x) for x in (out / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert opd_rows[0]["step"] == 0 and "tau" in opd_rows[0]
    assert any(r.get("step") == cfg.opd.loop.max_steps and "tau" in r for r in opd_rows)
    assert sum(1 for line in said if "started" in line) == len(STAGES)


def test_second_run_skips_finished_stages_and_rebuilds_the_same_report(quick_demo):
    cfg, out, report, _ = quick_demo
    first = report.read_text()
    said: list[str] = []
    t0 = time.perf_counter()
    again = run_demo(cfg, say=said.append)
    assert time.perf_counter() - t0 < 60
    assert sum(1 for line in said if "skipped" in line) == len(STAGES)
    assert again.read_text() == first


def test_interrupted_stage_resumes_from_its_checkpoint(quick_demo):
    """An unfinished stage (no done marker, checkpoints on disk) resumes; finished stages are not redone."""
    cfg, out, report, _ = quick_demo
    first = report.read_text()
    (out / "done" / "sft_continued.json").unlink()
    said: list[str] = []
    run_demo(cfg, say=said.append)
    started = [line for line in said if "started" in line]
    assert len(started) == 1 and "sft_continued" in started[0]
    log = (out / "logs" / "sft_continued.log").read_text()
    assert "resumed from" in log
    results = report.read_text().split("## Stages")[0]  # the stage-time table adds the resumed attempt
    assert results == first.split("## Stages")[0]


def test_tiny_demo_in_the_other_dtype(tiny_folder, tmp_path):
    """The whole pipeline in the dtype ``auto`` does not pick here (the quick demo above runs in auto): fp32 on a
    bf16 machine, bf16 on an AVX2 one, on a tiny random target, so both dtypes run end to end on every machine."""
    other = "fp32" if resolve_dtype("auto") == "bf16" else "bf16"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Question {i}: what is {i} + {i}?"}) for i in range(6)))
    overrides = [
        f"out={tmp_path / 'demo'}",
        f"target.path={tiny_folder}",
        f"target.dtype={other}",
        f"data.sources=[{prompts}]",
        "data.sampling.max_new_tokens=16",
        "sft.loop.max_steps=4",
        "sft.eval.max_new_tokens=8",
        "sft.loop.eval_every=4",
        "sft.loop.save_every=4",
        "opd.loop.max_steps=2",
        "opd.loop.eval_every=2",
        "opd.logp_min=-40",
        "bench.datasets=[gsm8k]",
        "bench.sampling.max_new_tokens=8",
        "tau.datasets=[gsm8k]",
        "tau.sampling.max_new_tokens=8",
    ]
    cfg = load(DemoConfig, QUICK, overrides)
    report = run_demo(cfg, say=lambda _: None)
    result = json.loads((tmp_path / "demo" / "bench" / "result.json").read_text())
    assert result["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[other]
    assert set(result["datasets"]["gsm8k"]["methods"]) == BENCHED
    assert result["dtype"] in report.read_text()
