"""The pipeline in this process on the tiny target (the fast tier's smoke test of what the CLI verbs run):
``data`` -> ``train sft`` (DFlash and EAGLE-3) -> ``train opd`` (replay), each given the target already loaded.
The CLI end to end (subprocesses, SIGKILL and resume, torchrun) is the slow tier's: tests/test_training.py."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftopd.config import (
    ArchConfig,
    DataConfig,
    EvalConfig,
    LoopConfig,
    OPDConfig,
    SamplingConfig,
    SFTConfig,
    TargetConfig,
)
from draftopd.data.trajectories import generate_trajectories
from draftopd.models.io import read_drafter
from draftopd.recipes import to_dict
from draftopd.train.checkpoints import save_checkpoint
from draftopd.train.opd import train_opd
from draftopd.train.sft import train_sft

from helpers import make_tiny_target, metric_rows, one_line_error, tiny_drafter

ARCH = {
    "dflash": ArchConfig(kind="dflash", num_layers=1, block_size=4),
    "eagle3": ArchConfig(kind="eagle3", draft_vocab_size=256, ttt_steps=2),
}


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    from draftopd.models.target import load_target

    return load_target(str(tiny_folder), "fp32")


@pytest.fixture(scope="module")
def data(tiny_folder, loaded, tmp_path_factory) -> Path:
    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {2 * i}?"}) + "\n" for i in range(6)))
    cfg = DataConfig(
        target=TargetConfig(path=str(tiny_folder), dtype="fp32"),
        sampling=SamplingConfig(max_new_tokens=12),
        sources=(str(prompts),),
        batch_size=3,
        chunk_size=3,
        out=str(tmp_path_factory.mktemp("data") / "traj"),
    )
    out = generate_trajectories(cfg, loaded)
    assert sorted(p.name for p in out.glob("shard_*.pt")) == ["shard_00000.pt", "shard_00001.pt"]
    return out


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_sft_then_opd_in_process(tiny_folder, loaded, data, tmp_path, kind):
    target_cfg = TargetConfig(path=str(tiny_folder), dtype="fp32")
    ev = EvalConfig(limit=1, max_new_tokens=4, chain_length=3)
    loop = LoopConfig(max_steps=6, lr=1e-2, warmup_ratio=0.0, log_every=1, eval_every=6, save_every=6)
    sft = SFTConfig(
        target=target_cfg, arch=ARCH[kind], eval=ev, data=str(data), out=str(tmp_path / "sft"), loop=loop,
        batch_size=2, blocks_per_seq=2,
    )  # fmt: skip
    final = train_sft(sft, loaded)
    assert final == tmp_path / "sft" / "final" and read_drafter(final, loaded).config.num_target_layers == 4
    losses = [r["loss"] for r in metric_rows(tmp_path / "sft") if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2])  # 6 steps at lr 1e-2 on 6 sequences: it learns
    assert any("tau" in r for r in metric_rows(tmp_path / "sft"))  # the eval ran with the engine

    loop = dataclasses.replace(OPDConfig().loop, max_steps=1, eval_every=100, save_every=1)  # OPD's other defaults
    opd = OPDConfig(
        target=target_cfg, eval=ev, init_from=str(final), data=str(data), out=str(tmp_path / "opd"), loop=loop,
        rollout_batch=2, micro_batch=2, max_new_tokens=12, chain_length=3, logp_min=-40.0,
    )  # fmt: skip
    assert opd.rollouts == "replay"  # the default: derived from the trajectories, no live generation
    out = train_opd(opd, loaded)
    rows = [r for r in metric_rows(tmp_path / "opd") if "loss" in r]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and rows[0]["rollout_tau"] >= 1.0
    assert type(read_drafter(out, loaded)) is type(read_drafter(final, loaded))


def old_layout(run_config: dict) -> str:
    """A run config as every run before the loop section stored it: the loop keys at the top level."""
    return json.dumps({k: v for k, v in run_config.items() if k != "loop"} | run_config["loop"])


def test_a_run_stored_before_the_loop_section_resumes(tiny_folder, loaded, data, tmp_path):
    """Its run configs (the folder's and the checkpoint's) are read in their layout: the run resumes from its
    checkpoint, no "another config" refusal, and ends with the weights of an uninterrupted run."""
    loop = LoopConfig(max_steps=4, lr=1e-2, warmup_ratio=0.0, log_every=1, eval_every=100, save_every=2)
    sft = SFTConfig(
        target=TargetConfig(path=str(tiny_folder), dtype="fp32"), arch=ARCH["dflash"],
        eval=EvalConfig(limit=1, max_new_tokens=4, chain_length=3), data=str(data), out=str(tmp_path / "straight"),
        loop=loop, batch_size=2, blocks_per_seq=2,
    )  # fmt: skip
    straight = train_sft(sft, loaded)
    old, step = tmp_path / "old", "step_000002"  # the old run: stopped after its checkpoint of step 2
    shutil.copytree(tmp_path / "straight" / "checkpoints" / step, old / "checkpoints" / step)
    (old / "checkpoints" / "latest").write_text(step)
    stored = json.loads((old / "checkpoints" / step / "run_config.json").read_text())
    for f in (old / "run_config.json", old / "checkpoints" / step / "run_config.json"):
        f.write_text(old_layout(stored))
    resumed = train_sft(dataclasses.replace(sft, out=str(old)), loaded)
    assert [r["step"] for r in metric_rows(old) if "loss" in r] == [3, 4]  # resumed at step 2, not started over
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_value_in_a_run_of_the_old_layout_is_still_refused(tmp_path):
    from draftopd import DraftopdError
    from draftopd.train.checkpoints import judge_run_folder

    run_config = json.loads(json.dumps(to_dict(SFTConfig(out=str(tmp_path)))))
    tmp_path.joinpath("run_config.json").write_text(old_layout(run_config))
    assert judge_run_folder(tmp_path, run_config) is None  # the same config: a fresh start (nothing to resume)
    changed = json.loads(json.dumps(to_dict(SFTConfig(out=str(tmp_path), loop=LoopConfig(lr=0.1)))))
    with pytest.raises(DraftopdError, match=r"holds a run with another config \(loop\.lr;"):
        judge_run_folder(tmp_path, changed)


def test_older_checkpoints_of_the_same_config_are_pruned(tmp_path):
    """A config with a tuple (AdamW's betas) is the same config once stored as JSON: older checkpoints are pruned
    down to ``keep``, multiples of ``keep_every`` kept (a tuple compared with its stored list kept them all)."""
    model = tiny_drafter("eagle3", make_tiny_target(layers=4), 0)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    config = {"loop": {"adam_betas": (0.9, 0.95), "lr": 1e-4}, "out": str(tmp_path)}
    for step in range(1, 7):
        save_checkpoint(tmp_path, step, model, opt, sched, {}, config, keep=2, keep_every=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000003", "step_000005", "step_000006"]


def test_a_refused_second_train_opd_names_train_opd(tiny_folder, loaded, data, tmp_path, capsys, monkeypatch):
    """The lock's label comes from the config's verb (``TrainConfig.VERB``): an OPD run holding its folder is named
    ``train opd`` to the run refused there (it said ``train sft`` while the label was guessed from the fields)."""
    from draftopd.models.io import write_drafter
    from draftopd.train.scaffold import load_sequences, start_or_resume

    init = tmp_path / "init"
    write_drafter(tiny_drafter("dflash", loaded, 0), init)
    out = tmp_path / "opd"
    cfg = OPDConfig(
        target=TargetConfig(path=str(tiny_folder), dtype="fp32"), eval=EvalConfig(limit=1, max_new_tokens=2),
        init_from=str(init), data=str(data), out=str(out), max_new_tokens=12,
    )  # fmt: skip
    run = start_or_resume(cfg.for_kind("dflash"), loaded, load_sequences(str(data)), build=None)
    try:
        args = ["train", "opd", "--target", str(tiny_folder), "--dtype", "fp32", "--set", f"init_from={init}",
                "--set", f"out={out}", "--set", f"data={data}", "--set", "max_new_tokens=12"]  # fmt: skip
        line = one_line_error(capsys, monkeypatch, *args, text="is in use by another draftopd process")
        assert "`draftopd train opd`" in line, line
    finally:
        run.release()


def test_replay_refuses_a_budget_past_the_datas(data, tmp_path):
    """A greedy response to N tokens says nothing past N: replay with a larger budget is one line, live is allowed;
    a folder of data folders is bounded by its smallest budget."""
    from draftopd import DraftopdError
    from draftopd.train.opd import check_budget

    with pytest.raises(DraftopdError, match="max_new_tokens 16 exceeds the 12 tokens"):
        check_budget(OPDConfig(data=str(data), max_new_tokens=16))
    check_budget(OPDConfig(data=str(data), max_new_tokens=12))
    check_budget(OPDConfig(data=str(data), max_new_tokens=16, rollouts="live"))
    pool = tmp_path / "pool"
    shutil.copytree(data, pool / "a")
    with pytest.raises(DraftopdError, match="exceeds the 12 tokens"):
        check_budget(OPDConfig(data=str(pool), max_new_tokens=13))
