"""Training end to end on a tiny target with the real tokenizer: data shards, SFT (DFlash, EAGLE-3),
SIGKILL + resume, and Draft-OPD from the SFT drafter."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import metric_rows, needs_default_target, run_cli, run_opd, sft_args

pytestmark = [pytest.mark.slow, needs_default_target]


# Training, OPD and export run in both dtypes (bf16: autocast with float32 master weights); exactness tests
# (resume equals an uninterrupted run) stay in fp32.
DTYPES = ["fp32", "bf16"]


@pytest.fixture(scope="module", params=DTYPES)
def sft_run(request, tiny_folder, shards, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sft") / "run"
    run_cli(*sft_args(tiny_folder, shards, out, steps=10, dtype=request.param), check=True)
    return out, request.param


@pytest.fixture(scope="module")
def shards_in(tiny_folder, shards, tmp_path_factory) -> Callable[[str], Path]:
    """dtype -> the trajectories of ``shards`` made by the tiny target in that dtype (``shards`` itself for fp32):
    replay takes only data made in the run's own dtype (docs/RELIABILITY.md, issue 33)."""
    made = {"fp32": shards}

    def get(dtype: str) -> Path:
        if dtype not in made:
            cfg = json.loads((shards / "manifest.json").read_text())["config"]
            out = tmp_path_factory.mktemp(f"data-{dtype}") / "traj"
            run_cli(
                "data", "--target", str(tiny_folder), "--dtype", dtype, "--out", str(out),
                "--max-new-tokens", str(cfg["sampling"]["max_new_tokens"]), "--set", f"sources={cfg['sources']}",
                "--set", f"chunk_size={cfg['chunk_size']}", "--set", f"batch_size={cfg['batch_size']}", check=True,
            )  # fmt: skip
            made[dtype] = out
        return made[dtype]

    return get


def test_sft_runs_and_writes_everything(sft_run):
    out, _ = sft_run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert any("tau" in r and r["tau"] >= 1.0 for r in rows)
    assert (out / "final" / "model.safetensors").exists()
    assert not list(out.glob("*.png"))  # training writes metrics; draftopd.report draws from them
    ck = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert {p.name for p in ck.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "training_state.pt",
        "run_config.json",
    }


@pytest.mark.parametrize("trainer", ["sft", "opd"])
def test_killed_at_random_moments_resumes_exactly(tiny_folder, shards, tmp_path, trainer):
    """SIGKILL at random moments (twice), then the same command: every resume succeeds, the metrics hold each
    row exactly once, and the final weights equal an uninterrupted run's (fp32)."""
    if trainer == "sft":
        args = lambda out: sft_args(tiny_folder, shards, out, steps=40)  # noqa: E731
    else:
        sft_final = (
            run_cli(*sft_args(tiny_folder, shards, tmp_path / "sft", steps=4), check=True)
            and tmp_path / "sft" / "final"
        )
        loop = ("loop.max_steps=6", "loop.save_every=1", "loop.log_every=1", "loop.eval_every=3")
        extra = tuple(a for key in loop for a in ("--set", key))
        args = lambda out: run_opd(tiny_folder, sft_final, out, shards, *extra, run=False)  # noqa: E731
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli(*args(straight), check=True)
    rng = random.Random(0)
    for _ in range(2):
        proc = run_cli(*args(killed), wait=False)
        deadline = time.time() + 300
        while not (killed / "metrics.jsonl").exists() or not metric_rows(killed):  # training has begun
            assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run_cli(*args(killed), check=True)  # resumes from the last complete checkpoint and finishes
    from draftopd.owner import FOLDER, LEGACY, PART

    left = [p for p in tmp_path.rglob("*") if any(r.match(p.name) for r in (PART, FOLDER, LEGACY))]
    assert left == [] and not list(tmp_path.rglob(".*.lock"))  # what the kills left, the next run removed
    last = "step_000040" if trainer == "sft" else "step_000006"
    a = load_file(str(straight / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / last / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    keys = lambda rows: sorted((r["step"], tuple(sorted(r))) for r in rows)  # noqa: E731
    assert keys(metric_rows(killed)) == keys(metric_rows(straight))  # no row lost, none duplicated


@pytest.mark.parametrize("dtype", DTYPES)
def test_eagle3_sft_smoke(tiny_folder, shards, tmp_path, dtype):
    out = tmp_path / "eagle"
    args = sft_args(tiny_folder, shards, out, steps=4, dtype=dtype)
    args += [
        "--set",
        "arch.kind=eagle3",
        "--set",
        "arch.draft_vocab_size=64",
        "--set",
        "arch.ttt_steps=3",
        "--set",
        "loop.eval_every=4",
    ]
    run_cli(*args, check=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("tau", 0) >= 1.0 for r in rows)
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 64


def test_resume_refuses_another_config(tiny_folder, shards, tmp_path):
    out = tmp_path / "run"
    run_cli(*sft_args(tiny_folder, shards, out, steps=5), check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "draftopd.cli", *sft_args(tiny_folder, shards, out, steps=5), "--set", "loop.lr=0.1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "another config" in proc.stderr


def test_opd_from_sft_changes_the_drafter(tiny_folder, shards_in, sft_run, tmp_path):
    sft_run, dtype = sft_run
    out = tmp_path / "opd"
    run_opd(tiny_folder, sft_run / "final", out, shards_in(dtype), dtype=dtype)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert all(r["resp_tokens"] > 0 and r["rej_tokens"] > 0 for r in train_rows)
    assert all(r["resp_loss_sum"] > 0 and r["rej_loss_sum"] > 0 and 0 < r["rej_share"] < 1 for r in train_rows)
    assert [r["step"] for r in rows if "tau" in r] == [0, 2]  # the starting drafter, then after training
    before = load_file(str(sft_run / "final" / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    weights = [k for k in before if before[k].is_floating_point()]  # not d2t, the draft vocabulary (kept)
    changed = [k for k in weights if not torch.equal(before[k].float(), after[k].float())]
    assert len(changed) == len(weights)  # every trainable tensor moved
    assert "d2t" in before and torch.equal(before["d2t"], after["d2t"])  # the default 32000 < 49152 tokens
    state = torch.load(out / "checkpoints" / "step_000002" / "training_state.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}  # a serving folder: fresh AdamW


def test_opd_from_a_training_checkpoint_carries_the_moments(tiny_folder, shards_in, sft_run, tmp_path):
    """From ``checkpoints/step_N`` the AdamW moments (and fc_scale) of the SFT run carry over: N + 2 steps."""
    sft_run, dtype = sft_run
    ckpt = sft_run / "checkpoints" / "step_000010"
    out = tmp_path / "opd"
    run_opd(tiny_folder, ckpt, out, shards_in(dtype), dtype=dtype)
    sft_state = torch.load(ckpt / "training_state.pt", weights_only=True)["optimizer"]["state"]
    state = torch.load(out / "checkpoints" / "step_000002" / "training_state.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {12}
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == 0.01  # the schedule is this run's
    moved = [
        not torch.equal(a["exp_avg_sq"], state["optimizer"]["state"][i]["exp_avg_sq"]) for i, a in sft_state.items()
    ]
    assert all(moved)
    before = load_file(str(ckpt / "model.safetensors"))
    after = load_file(str(out / "checkpoints" / "step_000002" / "model.safetensors"))
    assert torch.equal(before["fc_scale"], after["fc_scale"])  # the checkpoint's own feature scale is kept


@pytest.mark.parametrize("dtype", DTYPES)
def test_eagle3_opd_replays_rejected_chains(tiny_folder, shards, shards_in, tmp_path, dtype):
    """EAGLE-3 Draft-OPD (the verify blocks replayed, not the EAGLE-3 recipe's whole-sequence TTT): replay with the
    rejected tokens fed back."""
    sft = tmp_path / "eagle"
    extra = ["--set", "arch.kind=eagle3", "--set", "arch.draft_vocab_size=64", "--set", "arch.ttt_steps=3"]
    run_cli(
        *sft_args(tiny_folder, shards, sft, steps=2, dtype=dtype), *extra, "--set", "loop.eval_every=2", check=True
    )
    out = tmp_path / "opd"
    opd_extra = ("--set", "chain_length=3", "--set", "eval.chain_length=3", "--set", "anchors=verify")
    opd_extra += ("--set", "rej_weight=1", "--set", "loss=acceptance_aware")
    run_opd(tiny_folder, sft / "final", out, shards_in(dtype), *opd_extra, dtype=dtype)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert all(r["resp_tokens"] > 0 and r["rej_tokens"] > 0 for r in train_rows)
    before = load_file(str(sft / "final" / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert {"fc.weight", "lm_head.weight"} <= set(moved) and any(k.startswith("midlayer.") for k in moved)
