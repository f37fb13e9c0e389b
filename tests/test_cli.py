"""The console script: every verb has help; bad input gives one line on stderr and a non-zero exit."""

from __future__ import annotations

import json

import pytest

from draftopd.cli import main
from draftopd.models.io import write_drafter

from helpers import assert_one_line_error, needs_default_target, run_cli

pytestmark = pytest.mark.slow  # subprocesses: the console script as users run it


@pytest.mark.parametrize("verb", ["setup", "generate", "bench", "data", "train", "export", "demo"])
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: draftopd" in capsys.readouterr().out


def test_missing_model_path(tmp_path):
    assert_one_line_error(
        run_cli("generate", "--prompt", "hi", "--target", str(tmp_path / "nope")), "target not found"
    )


def test_folder_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--target", str(tmp_path)), "is not a causal LM")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--target", str(empty)), "has no config.json")


@needs_default_target
def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "test_dev.jsonl"
    bad.write_text('{"question": "What is 1+1?"}\n{"question": oops}\n')
    proc = run_cli("bench", "--datasets", "gsm8k", "--limit", "5", "--gsm8k", str(bad))
    assert_one_line_error(proc, f"{bad}:2: invalid JSON")


@needs_default_target
def test_prompt_longer_than_context():
    assert_one_line_error(run_cli("generate", "--prompt", "word " * 9000), "exceeds the target's context window")


@needs_default_target
def test_generate_json_and_show_acceptance():
    proc = run_cli("generate", "--prompt", "Say hello twice.", "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "token_ids", "tau"} and 1 <= len(out["token_ids"]) <= 12
    proc = run_cli("generate", "--prompt", "Repeat: a b c d. a b c d.", "--max-new-tokens", "16", "--show-acceptance")
    assert proc.returncode == 0 and "verify steps" in proc.stdout


@needs_default_target
def test_bench_small_run(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench",
        "--datasets",
        "gsm8k",
        "--limit",
        "1",
        "--max-new-tokens",
        "16",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "bench.png"),
        "--set",
        "warmup=0",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    row = result["datasets"]["gsm8k"]
    assert row["prompts"] == 1 and row["methods"]["pld"]["tau"] >= 1.0 and row["methods"]["pld"]["speedup"] > 0
    assert {"plain", "pld", "hf_plain", "hf_pld"} <= set(row["methods"])
    assert row["methods"]["pld"]["lossless"] == 1.0  # checked in fp32 whatever the bench dtype
    assert result["dtype"] in ("bfloat16", "float32") and result["threads"] >= 1 and result["commit"]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["datasets"]["gsm8k"]["prompts"] == 1
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_default_target
def test_bench_tau_only_pairs_prompts(tmp_path):
    out = tmp_path / "tau.json"
    proc = run_cli(
        *("bench", "--datasets", "gsm8k", "--limit", "3", "--max-new-tokens", "12", "--json", str(out)),
        *("--set", "tau_only=true", "--set", "batch_size=2"),
        *("--set", "methods={plain: {kind: none}, lookup: {kind: pld}}"),
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["datasets"]["gsm8k"]["methods"]
    plain, pld = rows["plain"]["per_prompt"], rows["lookup"]["per_prompt"]
    assert len(plain) == 3 and all(t == n for t, n in plain)  # plain decoding: one token per verify step
    assert [t for t, _ in pld] == [t for t, _ in plain]  # greedy is lossless: the same tokens per prompt
    line = next(x for x in proc.stdout.splitlines() if x.startswith("gsm8k") and "lookup" in x)
    assert "% [" in line  # the gain over the first method, with its interval


def test_paired_gain_interval():
    from draftopd import DraftopdError
    from draftopd.bench.run import paired_gain

    base = [[10, 8], [20, 15], [5, 5]]
    assert paired_gain(base, base) == (0.0, 0.0, 0.0)
    g, lo, hi = paired_gain(base, [[10, 5], [20, 10], [5, 3]])  # fewer verify steps on every prompt
    assert 0 < lo <= g <= hi
    # one prompt of ten carries the whole gain: resamples without it show none, so the interval reaches 0
    g, lo, hi = paired_gain([[10, 8]] * 10, [[10, 8]] * 9 + [[10, 2]])
    assert lo == 0.0 < g <= hi
    with pytest.raises(DraftopdError):
        paired_gain(base, base[:2])


@needs_default_target
def test_drafter_that_does_not_match_the_target(tmp_path):
    from draftopd.models.dflash import DFlashConfig, DFlashModel

    from helpers import make_tiny_target

    tiny = make_tiny_target(hidden=32)
    write_drafter(DFlashModel(DFlashConfig.from_target(tiny.config, 1, 4, 1, [0])), tmp_path / "d")
    proc = run_cli("generate", "--prompt", "hi", "--drafter", str(tmp_path / "d"), "--max-new-tokens", "4")
    assert_one_line_error(proc, "does not match the target: hidden_size 32 (target: 576)")
    assert_one_line_error(
        run_cli("generate", "--prompt", "hi", "--drafter", str(tmp_path / "none")), "drafter not found"
    )


@needs_default_target
def test_bad_prompt_files_for_data(tmp_path):
    out = tmp_path / "traj"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_one_line_error(run_cli("data", "--out", str(out), "--set", f"sources=[{empty}]"), "no prompts found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    assert_one_line_error(run_cli("data", "--out", str(out), "--set", f"sources=[{bad}]"), f"{bad}:2: invalid JSON")
    shapeless = tmp_path / "shapeless.jsonl"
    shapeless.write_text('{"text": "no known field"}\n')
    assert_one_line_error(
        run_cli("data", "--out", str(out), "--set", f"sources=[{shapeless}]"), "record 1 has none of"
    )
    assert not out.exists()  # nothing written
