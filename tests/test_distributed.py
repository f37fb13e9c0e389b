"""Data parallelism on the CPU: two gloo processes under torchrun train the same drafter as one process with the
same global batch (SFT and Draft-OPD, DFlash and EAGLE-3), and a two-process run killed with SIGKILL resumes in
one process to the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import metric_rows, run_cli, run_opd, sft_args

pytestmark = pytest.mark.slow  # subprocesses: the console script as users run it

EAGLE = ("--set", "arch.kind=eagle3", "--set", "arch.draft_vocab_size=64", "--set", "arch.ttt_steps=3")
OPD_EAGLE = (
    "--set",
    "chain_length=3",
    "--set",
    "eval.chain_length=3",
    "--set",
    "anchors=verify",
    "--set",
    "rej_weight=1",
)
OPD_EAGLE += ("--set", "loss=acceptance_aware")  # Draft-OPD's replay of the verify blocks, rejected chains included


def torchrun(*args: str, wait: bool = True):
    """``draftopd`` under torchrun with two processes of one thread each (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "draftopd.cli", *args, "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:  # its own process group: the launcher and both workers can be killed at once
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
        )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def same_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=atol), (
            k,
            (wa[k].float() - wb[k].float()).abs().max(),
        )


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_two_processes_train_what_one_trains(tiny_folder, shards, tmp_path, kind):  # noqa: F811
    """Global batch 2 (SFT) and 4 rollouts (OPD): one process takes all of it, two take half each. For DFlash the
    two processes also shard the target's decoder layers (FSDP2), which must not change anything either."""
    extra = EAGLE if kind == "eagle3" else ()
    shard = ("--set", "target.shard=true") if kind == "dflash" else ()
    opd_extra = OPD_EAGLE if kind == "eagle3" else ()
    runs = {}
    for n in (1, 2):
        sft, opd = tmp_path / f"sft{n}", tmp_path / f"opd{n}"
        args = [*sft_args(tiny_folder, shards, sft, steps=4), *extra, "--set", "loop.eval_every=4"]
        run_cli(*args, check=True) if n == 1 else torchrun(*args, *shard)
        # both OPD runs start from the one-process SFT drafter (final/ is bf16: a 1e-6 difference could round apart)
        opd_args = run_opd(
            tiny_folder, tmp_path / "sft1" / "final", opd, shards, *opd_extra, "--set", "rollout_batch=4", run=False
        )
        run_cli(*opd_args, check=True) if n == 1 else torchrun(*opd_args)
        runs[n] = (sft, opd)
    same_weights(runs[1][0] / "checkpoints" / "step_000004", runs[2][0] / "checkpoints" / "step_000004")
    # OPD: the two ranks roll out 2 prompts each instead of 4 together, and Adam divides each gradient by its own
    # running RMS, which magnifies summation-order noise in near-zero gradients: 1e-4 is 1% of one step (lr 0.01)
    same_weights(runs[1][1] / "checkpoints" / "step_000002", runs[2][1] / "checkpoints" / "step_000002", atol=1e-4)
    # the rows are of different lengths, split 2 + 2: with the update's global denominator the loss and the gradient
    # (its norm, before clipping) of step 1 are the one-process ones
    one, two = ([r for r in metric_rows(runs[n][1]) if "loss" in r][0] for n in (1, 2))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4) and two["grad_norm"] == pytest.approx(
        one["grad_norm"], rel=1e-4
    )


def test_two_process_run_killed_then_resumed_in_one(tiny_folder, shards, tmp_path):  # noqa: F811
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli(*sft_args(tiny_folder, shards, straight, steps=20), check=True)
    proc = torchrun(*sft_args(tiny_folder, shards, killed, steps=20), wait=False)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_000010").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, at once
    proc.wait()
    assert (killed / "checkpoints" / "latest").read_text().strip() < "step_000020"  # killed mid-way
    run_cli(*sft_args(tiny_folder, shards, killed, steps=20), check=True)  # one process resumes the two-process run
    same_weights(straight / "checkpoints" / "step_000020", killed / "checkpoints" / "step_000020", atol=1e-6)


def test_two_processes_generate_the_same_trajectories(tiny_folder, shards, tmp_path):  # noqa: F811
    """`draftopd data` under torchrun: rank r writes shards r, r + 2, ...; together the same shards as one process."""
    manifest = json.loads((shards / "manifest.json").read_text())["config"]
    out = tmp_path / "traj"
    torchrun(
        *("data", "--target", str(tiny_folder), "--dtype", "fp32", "--max-new-tokens", "24", "--out", str(out)),
        *("--set", f"sources=[{manifest['sources'][0]}]", "--set", "chunk_size=5", "--set", "batch_size=4"),
    )
    one, two = sorted(shards.glob("shard_*.pt")), sorted(out.glob("shard_*.pt"))
    assert [f.name for f in one] == [f.name for f in two]
    for a, b in zip(one, two, strict=True):
        assert torch.load(a, weights_only=True) == torch.load(b, weights_only=True)
