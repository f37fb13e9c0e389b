"""Issue 33, "one owner per folder, also through links": a test per finding. A run folder and a link to it share
one lock; a lock file that is a link (or not a plain file) is refused, nothing written through it; a writable run
folder under a read-only parent trains; every empty path value is refused; data with no usable trajectory, a
sequence past the context window, replay of another target's or of sampled data, and an engine that is not
installed are each one line before anything is written; and the smaller items (the OPD lock's label, an empty
``loop:`` section under ``--set loop.x``, a GSM8K question that is not a string).

Everything runs in this process on the tiny target of conftest.py (the fast tier); the race between two real
processes is in tests/test_ownership.py. docs/RELIABILITY.md lists what holds and which test shows it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from draftopd import DraftopdError
from draftopd.cli import main
from draftopd.owner import LOCK, acquire, lock_file

from helpers import cli_in_process, metric_rows, one_line_error, prompt_file


def data_args(tiny: Path, out: Path, prompts: Path, *extra: str) -> list[str]:
    return [
        "data", "--target", str(tiny), "--dtype", "fp32", "--max-new-tokens", "12", "--out", str(out),
        "--set", f"sources=[{prompts}]", "--set", "chunk_size=2", "--set", "batch_size=2", *extra,
    ]  # fmt: skip


def sft_args(tiny: Path, data: Path, out: Path | str, *extra: str) -> list[str]:
    return [
        "train", "sft", "--target", str(tiny), "--dtype", "fp32", "--set", f"data={data}", "--set", f"out={out}",
        "--set", "loop.max_steps=3", "--set", "batch_size=2", "--set", "blocks_per_seq=2",
        "--set", "loop.save_every=2", "--set", "loop.eval_every=1000", "--set", "loop.log_every=1",
        "--set", "eval.limit=1", "--set", "eval.max_new_tokens=4",
        "--set", "arch.block_size=4", "--set", "arch.num_layers=1", *extra,
    ]  # fmt: skip


def opd_args(tiny: Path, data: Path, out: Path, init_from: Path, *extra: str) -> list[str]:
    return [
        "train", "opd", "--target", str(tiny), "--dtype", "fp32", "--set", f"init_from={init_from}",
        "--set", f"out={out}", "--set", f"data={data}", "--set", "loop.max_steps=1", "--set", "rollout_batch=2",
        "--set", "micro_batch=2", "--set", "max_new_tokens=8", "--set", "eval.limit=1",
        "--set", "eval.max_new_tokens=4", "--set", "logp_min=-40", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return prompt_file(tmp_path_factory.mktemp("prompts"), 4)


@pytest.fixture(scope="module")
def data(tiny, prompts, tmp_path_factory) -> Path:
    """Greedy fp32 trajectories of the tiny target, as `draftopd data` writes them."""
    out = tmp_path_factory.mktemp("data") / "traj"
    assert main(data_args(tiny, out, prompts)) == 0
    return out


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- 1. one lock per resolved folder ----------------------------------------------------------------------------


def test_a_run_folder_and_a_link_to_it_have_one_owner(tiny, data, tmp_path, capsys, monkeypatch):
    """The race of the issue in one process: once ``train sft --set out=run`` holds its folder, before it has
    written anything, ``train sft --set out=runlink`` (another lr) starts and is refused in one line naming the
    holder; the first run finishes intact."""
    from draftopd.train import scaffold as common

    run, link = tmp_path / "run", tmp_path / "runlink"
    run.mkdir()
    link.symlink_to(run)
    assert lock_file(link, inside=True) == lock_file(run, inside=True) == run.resolve() / LOCK
    second: list[int] = []
    judge = common.judge_run_folder

    def racing(out, run_config, *rest):  # the first run looks into its folder: the second spelling arrives now
        if not second:
            second.append(-1)
            second[0] = main(sft_args(tiny, data, link, "--set", "loop.lr=0.1"))
        return judge(out, run_config, *rest)

    monkeypatch.setattr(common, "judge_run_folder", racing)
    rc, _, err = cli_in_process(capsys, monkeypatch, *sft_args(tiny, data, run))
    assert rc == 0 and second == [2], err
    lines = [ln[ln.index("error: ") :] for ln in err.splitlines() if "error: " in ln]  # after the first's bar
    assert len(lines) == 1 and f"runlink is in use by another draftopd process (pid {os.getpid()}" in lines[0], err
    assert "`draftopd train sft`" in lines[0]
    steps = [r["step"] for r in metric_rows(run) if "loss" in r]
    assert steps == [1, 2, 3]  # each step once: only the first run logged
    assert json.loads((run / "run_config.json").read_text())["loop"]["lr"] == 6e-4  # the first run's config
    assert (run / "final" / "model.safetensors").is_file() and not (run / LOCK).exists()


def test_a_folder_removed_as_its_lock_is_taken_is_made_again_and_removed_on_release(tmp_path, monkeypatch):
    """The folder exists (another owner made it) and vanishes as this one opens its lock (that owner's release
    removed it, empty): it is made again for the lock, and removed on release, as a folder this owner made."""
    import draftopd.owner as owner

    run = tmp_path / "run"
    run.mkdir()
    real, calls = owner._open_lock, []

    def vanishing(lock, path):
        if not calls:
            lock.parent.rmdir()
        calls.append(lock)
        return real(lock, path)

    monkeypatch.setattr(owner, "_open_lock", vanishing)
    with acquire(run, "data", inside=True):
        assert len(calls) == 2 and names(run) == [LOCK]
    assert names(tmp_path) == []


def test_a_lock_file_that_is_a_link_is_refused_and_nothing_is_written_through_it(
    tiny, data, tmp_path, capsys, monkeypatch
):
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's own file\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).symlink_to(secret)  # inside a run folder: train refuses it
    one_line_error(capsys, monkeypatch, *sft_args(tiny, data, run), text=f"its lock file {run / LOCK} is a symbolic")
    (run / LOCK).unlink()
    outside = tmp_path / "elsewhere" / "made.txt"
    (run / LOCK).symlink_to(outside)  # dangling: following it would make a file outside the run folder
    one_line_error(capsys, monkeypatch, *sft_args(tiny, data, run), text="is a symbolic link")
    assert not outside.parent.exists() and names(run) == [LOCK]
    beside = tmp_path / ".r.json.lock"
    beside.symlink_to(secret)  # beside a file: bench refuses it before the target loads
    bench = ["bench", "--target", str(tmp_path / "none"), "--json", str(tmp_path / "r.json")]
    one_line_error(capsys, monkeypatch, *bench, text="is a symbolic link")
    assert secret.read_text() == "the user's own file\n" and secret.stat().st_nlink == 1
    # a hard link to the user's file and a folder in the lock's place: refused too, nothing written
    (run / LOCK).unlink()
    os.link(secret, run / LOCK)
    with pytest.raises(DraftopdError, match="has other hard links"):
        acquire(run, "data", inside=True)
    (run / LOCK).unlink()
    (run / LOCK).mkdir()
    with pytest.raises(DraftopdError, match="cannot lock"):
        acquire(run, "data", inside=True)
    assert secret.read_text() == "the user's own file\n"
    assert names(tmp_path) == [".r.json.lock", "run", "secret.txt"]
    # a run folder reached through a dangling link is refused, nothing made where it points
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    one_line_error(capsys, monkeypatch, *sft_args(tiny, data, dangling), text="which does not exist")
    assert not (tmp_path / "nowhere").exists()


# --- 2. a writable run folder under a read-only parent -----------------------------------------------------------

CLONE_FS, CLONE_NEWNS, MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x200, 0x20000, 1, 32, 4096, 16384, 1 << 18


@contextlib.contextmanager
def read_only(parent: Path, *writable: Path) -> Iterator[None]:
    """``parent`` read-only, the folders ``writable`` inside it still writable, for this thread. Not as root:
    permission bits. As root (which ignores them): a read-only bind mount of ``parent`` in a mount namespace of
    this thread alone (threads it starts share it), left when the block ends; skipped where the kernel refuses."""
    if os.geteuid() != 0:
        parent.chmod(0o555)
        try:
            yield
        finally:
            parent.chmod(0o755)
        return
    libc = ctypes.CDLL(None, use_errno=True)

    def call(rc: int, what: str) -> None:
        if rc != 0:
            pytest.skip(
                f"root ignores permission bits, and no read-only mount here ({what}: errno {ctypes.get_errno()})"
            )

    home, cwd = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY), os.getcwd()
    try:
        call(libc.unshare(CLONE_NEWNS), "unshare")
        try:
            call(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "private")  # nothing leaks to the host
            call(libc.mount(bytes(parent), bytes(parent), None, MS_BIND, None), "bind")
            for w in writable:
                call(libc.mount(bytes(w), bytes(w), None, MS_BIND, None), "bind")
            call(libc.mount(None, bytes(parent), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None), "read-only")
            yield
        finally:
            # back (threads started in the block share this thread's file-system state: setns wants it alone)
            assert libc.unshare(CLONE_FS) == 0 and libc.setns(home, CLONE_NEWNS) == 0, ctypes.get_errno()
            os.chdir(cwd)
    finally:
        os.close(home)


def test_a_writable_run_folder_under_a_read_only_parent_trains(tiny, data, prompts, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "shared"
    run, traj = parent / "run", parent / "traj"
    run.mkdir(parents=True)
    traj.mkdir()
    with read_only(parent, run, traj):
        with pytest.raises(OSError):  # the simulation holds: nothing can be made in the parent
            (parent / "probe").write_text("x")
        rc, _, err = cli_in_process(capsys, monkeypatch, *data_args(tiny, traj, prompts))
        assert rc == 0, err
        rc, _, err = cli_in_process(capsys, monkeypatch, *sft_args(tiny, traj, run))
        assert rc == 0, err
    assert (run / "final" / "model.safetensors").is_file() and names(parent) == ["run", "traj"]
    assert LOCK not in names(run) + names(traj)


# --- 3. empty path values -----------------------------------------------------------------------------------------


def test_every_empty_path_value_is_refused(tiny, drafter, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default outputs (runs/...) would land here
    none = str(tmp_path / "no-target")  # were the value dropped, the run would stop at the missing target
    for argv, flag in (
        (["data", "--target", none, "--config", ""], "--config ''"),
        (["train", "sft", "--target", none, "--config", " "], "--config ' '"),
        (["generate", "--prompt", "hi", "--target", none, "--config", ""], "--config ''"),
        (["bench", "--target", none, "--json", ""], "--json ''"),
        (["bench", "--target", none, "--plot", ""], "--plot ''"),
        (["bench", "--target", none, "--gsm8k", ""], "--gsm8k ''"),
        (["data", "--target", none, "--gsm8k", ""], "--gsm8k ''"),
        (["export", str(drafter), str(work / "x"), "--bench", ""], "--bench ''"),
        (["export", str(drafter), str(work / "x"), "--target", ""], "--target ''"),
        (["generate", "--prompt", "hi", "--target", ""], "--target ''"),
    ):
        line = one_line_error(capsys, monkeypatch, *argv, text=flag)
        assert line.startswith(f"error: {flag}: give "), line
    assert names(work) == [] and names(tmp_path) == ["work"]


# --- 4. data with no usable trajectory, past the context window ----------------------------------------------------


def test_data_with_no_usable_trajectory_is_one_line_before_any_write(
    tiny, data, drafter, prompts, tmp_path, capsys, monkeypatch
):
    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save([], empty / "shard_00000.pt")  # every shard empty
    torch.save([], empty / "shard_00001.pt")
    short = tmp_path / "short"
    assert cli_in_process(capsys, monkeypatch, *data_args(tiny, short, prompts, "--max-new-tokens", "1"))[0] == 0
    out = tmp_path / "out"
    for folder, why in ((empty, "every one is empty"), (short, "made with max_new_tokens 1")):
        for argv in (sft_args(tiny, folder, out), opd_args(tiny, folder, out, drafter)):  # drafter: a checkpoint
            line = one_line_error(capsys, monkeypatch, *argv, text=f"{folder}: no usable trajectory")
            assert why in line, line
            assert not out.exists()
    argv = sft_args(tiny, data, out, "--set", "max_len=3")  # every prompt is longer than 1 token
    one_line_error(capsys, monkeypatch, *argv, text="max_len 3 cuts each to less than its prompt + 2 tokens")
    assert not out.exists()
    long = tmp_path / "long"
    long.mkdir()  # one trajectory of 1100 tokens: past the tiny target's 1024 positions unless max_len cuts it
    torch.save([{"prompt": list(range(5, 1005)), "response": list(range(5, 105))}], long / "shard_00000.pt")
    argv = sft_args(tiny, long, out, "--set", "max_len=2000")
    line = one_line_error(capsys, monkeypatch, *argv, text="max_len 2000: the longest trajectory of")
    assert "keeps 1100 tokens, past the target's context window of 1024" in line and not out.exists()


# --- 5. replay checks what it replays -------------------------------------------------------------------------------


def test_replay_refuses_another_targets_and_sampled_data(tiny, data, drafter, prompts, tmp_path, capsys, monkeypatch):
    from draftopd.train.scaffold import Run

    other = tmp_path / "other-target"
    shutil.copytree(tiny, other)  # the same weights in another folder: another target as far as data can tell
    theirs, sampled = tmp_path / "theirs", tmp_path / "sampled"
    assert cli_in_process(capsys, monkeypatch, *data_args(other, theirs, prompts))[0] == 0
    args = data_args(tiny, sampled, prompts, "--set", "sampling.temperature=0.8")
    assert cli_in_process(capsys, monkeypatch, *args)[0] == 0
    out = tmp_path / "opd"
    line = one_line_error(capsys, monkeypatch, *opd_args(tiny, theirs, out, drafter), text="rollouts replay")
    assert f"made by target {str(other)!r}, this run's is {str(tiny)!r}" in line, line
    line = one_line_error(capsys, monkeypatch, *opd_args(tiny, sampled, out, drafter), text="rollouts replay")
    assert "sampled at temperature 0.8, replay needs 0" in line, line
    assert not out.exists()
    # both in one line; the dtype too; a link to the same target, or no manifest at all, is accepted
    from draftopd.train.replay import check_replay_data

    with pytest.raises(DraftopdError, match=r"made by target .*; made in float32, this run's target is bfloat16"):
        check_replay_data(theirs, str(tiny), torch.bfloat16)
    link = tmp_path / "tiny-link"
    link.symlink_to(tiny)
    check_replay_data(data, str(link), torch.float32)
    bare = tmp_path / "bare"  # no manifest (a hand-made folder): taken as it is; a folder of data folders is a
    bare.mkdir()  # pool, each of its folders checked (tmp_path itself now holds `theirs` and `sampled`)
    check_replay_data(bare, str(other), torch.bfloat16)
    with pytest.raises(DraftopdError, match="sampled at temperature 0.8"):
        check_replay_data(tmp_path, str(tiny), torch.float32)
    # live rollouts regenerate from the prompts: the sampled data's prompts are fine there; its lock says `train opd`
    labels: list[str] = []
    end_step = Run.end_step

    def peek(self, done, *a, **kw):
        labels.append(lock_file(self.out, inside=True).read_text())
        return end_step(self, done, *a, **kw)

    monkeypatch.setattr(Run, "end_step", peek)
    rc, _, err = cli_in_process(capsys, monkeypatch, *opd_args(tiny, sampled, out, drafter, "--set", "rollouts=live"))
    assert rc == 0, err
    assert labels and labels[0] == f"{os.getpid()} train opd\n"


# --- 6. an engine that is not installed -----------------------------------------------------------------------------


def test_data_engine_vllm_absent_is_one_line_and_leaves_the_folder_usable(
    tiny, prompts, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("draftopd.data.vllm_engine.vllm_available", lambda: False)
    traj = tmp_path / "traj"
    args = data_args(tiny, traj, prompts)
    one_line_error(capsys, monkeypatch, *args, "--engine", "vllm", text="engine vllm: vllm is not importable")
    assert names(tmp_path) == []  # nothing written, not even the folder
    traj.mkdir()
    one_line_error(capsys, monkeypatch, *args, "--engine", "vllm", text="engine vllm")
    assert names(traj) == []
    # a manifest that a failed start left (no shard made): the folder is still usable with the default engine
    (traj / "manifest.json").write_text(json.dumps({"prompts": 4, "prompts_sha256": "0" * 64, "settings": {}}))
    assert cli_in_process(capsys, monkeypatch, *args)[0] == 0
    assert len(list(traj.glob("shard_*.pt"))) == 2


# --- 7. the smaller items -------------------------------------------------------------------------------------------


def test_an_empty_loop_section_takes_dotted_overrides(tmp_path):
    from draftopd.config import SFTConfig
    from draftopd.recipes import load

    recipe = tmp_path / "sft.yaml"
    recipe.write_text("loop:\nbatch_size: 4\n")  # `loop:` with nothing under it
    cfg = load(SFTConfig, recipe, ["loop.max_steps=5"])
    assert cfg.loop.max_steps == 5 and cfg.loop.lr == SFTConfig().loop.lr and cfg.batch_size == 4
    with pytest.raises(DraftopdError, match="batch_size is not a section"):
        load(SFTConfig, recipe, ["batch_size.x=1"])


def test_a_gsm8k_question_that_is_not_a_string_is_refused(tmp_path, monkeypatch):
    from draftopd.data.eval_sets import gsm8k

    file = tmp_path / "g.jsonl"
    for bad, what in ((None, "NoneType, not a string"), (7, "int, not a string"), ("  ", "empty")):
        file.write_text(json.dumps({"question": "Fine?", "answer": "1"}) + "\n" + json.dumps({"question": bad}) + "\n")
        monkeypatch.setenv("DRAFTOPD_GSM8K", str(file))
        with pytest.raises(DraftopdError, match=f"record 2: 'question' is {what}"):
            gsm8k(split="train")
