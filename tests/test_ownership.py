"""Issue 22, "one owner per folder": no run, export or demo destroys what it did not make, and every failure is
one line. A test per item: the output lock (a second owner refused naming the holder's pid, a dead owner's lock
taken over), export's SRC/OUT overlap, run folders judged by what they hold, damaged files on resume, writer
failures, temporaries of killed runs swept by the next run, size bounds, pickle-only targets, tiny
temperatures, empty ``--out``/``--drafter``, the context window of ``data`` and ``train opd``.

Most tests call the CLI in-process on the tiny target of conftest.py; the races and kills need real processes
(``draftopd`` subprocesses). docs/RELIABILITY.md lists what holds and which test shows it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError

from draftopd import DraftopdError
from draftopd.atomic import atomic_folder, replacing, write_text
from draftopd.models.eagle3 import Eagle3Config
from draftopd.models.layouts import KINDS
from draftopd.owner import FOLDER, LEGACY, PART, acquire, lock_file, sweep

from helpers import cli_in_process, error_lines, needs_default_target, one_line_error, run_cli

pytestmark = pytest.mark.slow  # subprocesses: the console script as users run it

COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}


def stray(*folders: Path) -> list[str]:
    """Temporary names of our writers (files or folders) under ``folders``, recursively, and lock files."""
    return sorted(
        str(p)
        for f in folders
        if f.exists()
        for p in f.rglob("*")
        if PART.match(p.name) or FOLDER.match(p.name) or LEGACY.match(p.name) or p.name.endswith((".lock", ".part"))
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- fixtures: a tiny drafter, data and a finished SFT run -------------------------------------------------------


@pytest.fixture(scope="module")
def data(tiny, tmp_path_factory) -> Path:
    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n" for i in range(6)))
    out = tmp_path_factory.mktemp("data") / "traj"
    proc = run_cli(*data_args(tiny, out, prompts))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def data_args(tiny: Path, out: Path, prompts: Path, *extra: str) -> list[str]:
    return [
        "data", "--target", str(tiny), "--dtype", "fp32", "--max-new-tokens", "12", "--out", str(out),
        "--set", f"sources=[{prompts}]", "--set", "chunk_size=2", "--set", "batch_size=2", *extra,
    ]  # fmt: skip


def sft_args(tiny: Path, data: Path, out: Path, steps: int = 4, *extra: str) -> list[str]:
    return [
        "train", "sft", "--target", str(tiny), "--dtype", "fp32", "--set", f"data={data}", "--set", f"out={out}",
        "--set", f"loop.max_steps={steps}", "--set", "batch_size=2", "--set", "blocks_per_seq=2",
        "--set", "loop.save_every=2", "--set", "loop.eval_every=1000", "--set", "eval.limit=1",
        "--set", "eval.max_new_tokens=4",
        "--set", "arch.block_size=4", "--set", "arch.num_layers=1", "--set", "loop.log_every=1", *extra,
    ]  # fmt: skip


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. the lock -------------------------------------------------------------------------------------------------


def test_lock_refuses_a_second_owner_naming_its_pid_and_takes_over_a_dead_ones(tmp_path):
    out = tmp_path / "run"
    held = acquire(out, "train sft")
    assert lock_file(out).read_text().split()[:2] == [str(os.getpid()), "train"]
    with pytest.raises(DraftopdError, match=f"in use by another draftopd process \\(pid {os.getpid()}") as e:
        acquire(out, "export")
    assert "\n" not in str(e.value)
    held.release()
    assert not lock_file(out).exists()  # released: nothing left beside the output
    # a lock file left by a process that died (kill -9 leaves it; the kernel dropped its flock): taken over
    lock_file(out).write_text(f"{dead_pid()} data\n")
    with acquire(out, "data"):
        assert lock_file(out).read_text().split()[0] == str(os.getpid())
    # a process that holds it and is killed with -9: its lock is free at once
    code = (
        "import sys, time; from draftopd.owner import acquire; x = acquire(sys.argv[1], 'data'); print(1, flush=True)"
    )
    code += "; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"
    with pytest.raises(DraftopdError, match=f"pid {proc.pid}, `draftopd data`"):
        acquire(out, "data")
    proc.kill()
    proc.wait()
    acquire(out, "data").release()


def test_temporary_names_are_unique(tmp_path):
    from draftopd.atomic import _part

    names = {_part(tmp_path / "x.json").name for _ in range(200)}
    assert len(names) == 200 and all(PART.match(n) for n in names)
    with atomic_folder(tmp_path / "a") as t1, atomic_folder(tmp_path / "a") as t2:
        assert t1 != t2 and FOLDER.match(t1.name) and FOLDER.match(t2.name)
    assert stray(tmp_path) == []


# --- 2. export: SRC and OUT never overlap, one exporter per OUT ----------------------------------------------------


def test_export_into_its_own_run_folder_leaves_it_intact(drafter, tmp_path, capsys, monkeypatch):
    """The slip of the issue: ``export run/final run --force`` (meant: run-export). Refused, the run untouched."""
    run_dir = tmp_path / "run"
    shutil.copytree(drafter, run_dir / "final")
    shutil.copytree(drafter, run_dir / "checkpoints" / "step_000002")
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "tau": 1.0}\n')
    before = tree(run_dir)
    for argv in (
        [str(run_dir / "final"), str(run_dir), "--force"],  # OUT holds SRC
        [str(run_dir / "final"), str(run_dir)],
        [str(run_dir), str(run_dir / "final" / "x"), "--force"],  # OUT inside SRC
        [str(run_dir / "final"), str(run_dir / "final"), "--force"],  # the same folder
        [str(run_dir / "final"), str(tmp_path), "--force"],  # OUT two levels up
    ):
        one_line_error(capsys, monkeypatch, "export", *argv, text="the source")
    link = tmp_path / "link"
    link.symlink_to(run_dir)  # OUT reaches SRC through a symbolic link
    one_line_error(capsys, monkeypatch, "export", str(run_dir / "final"), str(link), "--force", text="the source")
    assert tree(run_dir) == before and stray(tmp_path) == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    one_line_error(capsys, monkeypatch, "export", str(run_dir / "final"), str(dangling), text="symbolic link")
    assert dangling.is_symlink() and stray(tmp_path) == []
    rc, out, _ = cli_in_process(capsys, monkeypatch, "export", str(run_dir / "final"), str(tmp_path / "run-export"))
    assert rc == 0 and (tmp_path / "run-export" / "model.safetensors").is_file() and tree(run_dir) == before


def test_two_concurrent_exports_to_one_folder_end_with_one_refused(drafter, tmp_path, capsys, monkeypatch):
    out = tmp_path / "serve"
    with acquire(out, "export"):  # an export in progress: a second is refused naming its pid
        one_line_error(capsys, monkeypatch, "export", str(drafter), str(out), text=f"pid {os.getpid()}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "draftopd.cli", "export", str(drafter), str(out), "--dtype", dt],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for dt in ("fp32", "bf16")
    ]  # fmt: skip
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], results
    (_, won, _), (_, _, lost) = sorted(results, key=lambda r: r[0])
    assert len(error_lines(lost)) == 1 and ("in use by" in lost or "not empty" in lost), lost
    dtype = "fp32" if "fp32" in won.splitlines()[0] else "bf16"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]  # the folder holds the winner
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert stray(tmp_path) == []


# --- 3. run folders judged by what they hold ---------------------------------------------------------------------


@needs_default_target
@pytest.mark.parametrize("spelling", ["run", "runlink"])
def test_two_concurrent_train_sft_end_with_one_refused_and_each_step_logged_once(tiny, data, tmp_path, spelling):
    """The second process names the run folder as the first does, or (issue 33) through a symbolic link to it; the
    two learning rates differ, so the run left is shown to be the winner's alone."""
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "runlink").symlink_to(out)
    lrs = [0.0006, 0.01]
    cmds = [
        [sys.executable, "-m", "draftopd.cli",
         *sft_args(tiny, data, tmp_path / name, 100, "--set", "loop.save_every=25", "--set", f"loop.lr={lr}")]
        for name, lr in zip(["run", spelling], lrs, strict=True)
    ]  # fmt: skip
    # started together: the first to lock trains ~5 s (100 steps), the other arrives within a second and is refused
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], [(r[0], r[2][-800:]) for r in results]
    lost = next(r[2] for r in results if r[0] == 2)
    assert len(error_lines(lost)) == 1 and "in use by another draftopd process (pid" in lost, lost
    won = lrs[[r[0] for r in results].index(0)]
    assert json.loads((out / "run_config.json").read_text())["loop"]["lr"] == won
    keys = [(r["step"], tuple(sorted(r))) for r in rows(out)]
    assert len(keys) == len(set(keys)) and max(k[0] for k in keys) == 100  # every row once
    assert (out / "final" / "model.safetensors").is_file() and stray(tmp_path) == []


@needs_default_target
def test_training_into_a_run_whose_checkpoints_were_removed_refuses_or_resumes(
    tiny, data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert cli_in_process(capsys, monkeypatch, *sft_args(tiny, data, out, 4))[0] == 0
    final = tree(out / "final")
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000002", "step_000004"]
    # latest names a step that is gone: resumes from the newest complete one, and keeps it until a newer exists
    shutil.rmtree(ck / "step_000004")
    assert cli_in_process(capsys, monkeypatch, *sft_args(tiny, data, out, 4))[0] == 0
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000002", "step_000004"]
    assert [r["step"] for r in rows(out)].count(3) == 1
    # another config while checkpoints are there: refused, nothing pruned
    one_line_error(capsys, monkeypatch, *sft_args(tiny, data, out, 4), "--set", "loop.lr=0.1", text="another config")
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000002", "step_000004"]
    final = tree(out / "final")
    # every checkpoint removed, latest left: refused naming it
    for p in ck.glob("step_*"):
        shutil.rmtree(p)
    one_line_error(capsys, monkeypatch, *sft_args(tiny, data, out, 4), text="no complete checkpoint is left")
    # checkpoints/ removed: a finished run (final/) is never trained over, with this config or another
    shutil.rmtree(ck)
    one_line_error(capsys, monkeypatch, *sft_args(tiny, data, out, 4), text="holds a finished run (final/)")
    one_line_error(capsys, monkeypatch, *sft_args(tiny, data, out, 6), text="holds a finished run (final/)")
    assert tree(out / "final") == final
    # final/ gone too: the root run_config.json still says which config the folder holds
    shutil.rmtree(out / "final")
    one_line_error(capsys, monkeypatch, *sft_args(tiny, data, out, 6), text="loop.max_steps")
    assert stray(tmp_path) == []


@needs_default_target
def test_a_moved_run_resumes_with_other_threads(tiny, data, tmp_path, capsys, monkeypatch):
    first = tmp_path / "first"
    assert cli_in_process(capsys, monkeypatch, *sft_args(tiny, data, first, 2))[0] == 0
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    first.rename(moved)
    rc, _, err = cli_in_process(capsys, monkeypatch, *sft_args(tiny, data, moved, 2), "--threads", "1")
    assert rc == 0, err
    assert [r["step"] for r in rows(moved)].count(0) == 1


@needs_default_target
def test_damaged_files_on_resume_are_one_line_and_a_torn_metrics_line_is_dropped(
    tiny, data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    args = sft_args(tiny, data, out, 2, "--set", "loop.save_every=1")
    assert cli_in_process(capsys, monkeypatch, *args)[0] == 0
    ck = out / "checkpoints" / "step_000002"
    metrics = out / "metrics.jsonl"
    # a kill in the middle of an append: the last line torn; the resume drops it and finishes
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 2, "lo')
    assert cli_in_process(capsys, monkeypatch, *args)[0] == 0
    assert metrics.read_text() == whole
    metrics.write_text('{"step": 0}\n{"ste\n' + whole)  # a bad line that is not the last: named with its line
    one_line_error(capsys, monkeypatch, *args, text="metrics.jsonl:2: not a metrics row")
    metrics.write_text(whole)
    for name, content, text in (
        ("run_config.json", b"", "run_config.json:1: not a run config"),
        ("run_config.json", b"[1, 2]", "run_config.json: not a run config"),
        ("training_state.pt", None, "training_state.pt: not a draftopd training state (no optimizer"),
        ("training_state.pt", b"PK\x03\x04 torn", "training_state.pt: not a training state"),
        ("model.safetensors", b"\x00" * 8, "model.safetensors"),
        ("config.json", b"{", "config.json"),
    ):
        saved = (ck / name).read_bytes()
        if content is None:
            torch.save({"step": 2, "model": {}}, ck / name)  # another trainer's state (SpecForge keeps weights)
        else:
            (ck / name).write_bytes(content)
        one_line_error(capsys, monkeypatch, *args, text=text)
        (ck / name).write_bytes(saved)
    (out / "run_config.json").write_text("")  # the root one too
    one_line_error(capsys, monkeypatch, *args, text=f"{out / 'run_config.json'}:1: not a run config")
    assert stray(tmp_path) == []


# --- 4. writer failures are one line naming the file -------------------------------------------------------------

ERRNOS = [errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EFBIG]


@settings(max_examples=60, **COMMON)
@given(
    kind=st.sampled_from(["oserror", "torch", "safetensors"]),
    code=st.sampled_from(ERRNOS),
    writer=st.sampled_from(["write_text", "replacing", "atomic_folder"]),
    name=st.text(
        st.characters(codec="utf-8", exclude_categories=("Cc",), exclude_characters="/"), min_size=1, max_size=20
    ).filter(lambda n: n not in (".", "..")),
)
@example(kind="torch", code=errno.ENOSPC, writer="replacing", name="shard_00000.pt")
def test_writer_failures_are_one_line_naming_the_file(kind, code, writer, name):
    def fail() -> None:
        if kind == "oserror":
            raise OSError(code, os.strerror(code))
        if kind == "torch":
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        with pytest.raises(DraftopdError) as e:
            if writer == "write_text":
                import draftopd.atomic as atomic

                real = atomic.os.fsync
                try:
                    atomic.os.fsync = lambda fd: fail()
                    write_text(path, "x")
                finally:
                    atomic.os.fsync = real
            elif writer == "replacing":
                with replacing(path) as tmp:
                    tmp.write_bytes(b"half")
                    fail()
            else:
                with atomic_folder(path) as tmp:
                    (tmp / "model.safetensors").write_bytes(b"half")
                    fail()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"cannot write {path}"), msg
        assert not any(Path(d).iterdir()), list(Path(d).iterdir())  # no temporary left, nothing under the name


def limited(size: int):
    """For a child process: files larger than ``size`` bytes cannot be written (EFBIG, as a full disk would)."""

    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return pre


@needs_default_target
def test_a_full_disk_in_data_train_and_export_is_one_line(tiny, data, drafter, tmp_path):
    """Real writers (torch.save, safetensors, json) hit a real write error: one line naming the file, exit 2."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(4)))
    cases = [
        (data_args(tiny, tmp_path / "traj", prompts), 600, str(tmp_path / "traj" / "manifest.json")),  # json
        (data_args(tiny, tmp_path / "traj", prompts), 1000, str(tmp_path / "traj" / "shard_00000.pt")),  # torch
        (sft_args(tiny, data, tmp_path / "run", 2), 20_000, str(tmp_path / "run" / "features.pt")),  # torch
        (["export", str(drafter), str(tmp_path / "serve"), "--dtype", "fp32"], 20_000, str(tmp_path / "serve")),
    ]  # safetensors, the last
    for argv, size, name in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "draftopd.cli", *argv],
            capture_output=True, text=True, preexec_fn=limited(size), timeout=300,
        )  # fmt: skip
        lines = error_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
        assert lines[0].startswith("error: cannot write ") and name in lines[0], lines[0]
    assert stray(tmp_path) == []
    assert not (tmp_path / "serve").exists()


# --- 5. temporaries of killed runs are removed by the next run ---------------------------------------------------

WRITE_AND_HANG = """
import sys, time, torch
from draftopd.atomic import atomic_folder, replacing
kind, path = sys.argv[1], sys.argv[2]
cm = atomic_folder(path) if kind == "folder" else replacing(path)
with cm as tmp:
    (tmp / "model.safetensors").write_bytes(b"half") if kind == "folder" else torch.save([1], tmp)
    print(tmp, flush=True)
    time.sleep(60)
"""


def killed_mid_write(kind: str, path: Path) -> Path:
    """A process killed with -9 while writing ``path`` (a folder or a file): returns what it left."""
    proc = subprocess.Popen([sys.executable, "-c", WRITE_AND_HANG, kind, str(path)], stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait()
    assert left.exists()
    return left


@needs_default_target
def test_kill_9_leaves_no_stray_temporary_after_the_next_run(tiny, data, drafter, tmp_path, capsys, monkeypatch):
    # export: killed mid-write (a weights-holding .OUT.tmp-PID folder), and at random moments of a real export
    out = tmp_path / "serve"
    rng = random.Random(22)
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "draftopd.cli", "export", str(drafter), str(out), "--force"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(1.0, 5.0))
        proc.kill()
        proc.wait()
    killed_mid_write("folder", out)
    # killed between the two renames that replace OUT: the previous OUT comes back
    if out.exists():
        out.rename(tmp_path / f".serve.old-{dead_pid()}-abc123")
    assert stray(tmp_path)
    assert cli_in_process(capsys, monkeypatch, "export", str(drafter), str(out), "--force")[0] == 0
    assert stray(tmp_path) == [] and sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    # data: a shard killed mid-write; the rerun on the same folder removes it
    traj = tmp_path / "traj"
    shutil.copytree(data, traj)
    killed_mid_write("file", traj / "shard_00001.pt")
    (traj / "shard_00001.pt").unlink()  # and that shard was never finished
    prompts = next(iter(json.loads((data / "manifest.json").read_text())["config"]["sources"]))
    assert stray(traj)
    assert cli_in_process(capsys, monkeypatch, *data_args(tiny, traj, Path(prompts)))[0] == 0
    assert stray(tmp_path) == [] and (traj / "shard_00001.pt").is_file()
    # train: a checkpoint and final/ killed mid-write, and the fixed names of older releases
    run_dir = tmp_path / "run"
    assert cli_in_process(capsys, monkeypatch, *sft_args(tiny, data, run_dir, 2))[0] == 0
    killed_mid_write("folder", run_dir / "checkpoints" / "step_000004")
    killed_mid_write("folder", run_dir / "final")
    killed_mid_write("file", run_dir / "metrics.jsonl")
    (run_dir / "checkpoints" / "step_000006.part").mkdir()
    (run_dir / "features.part").write_bytes(b"half")
    assert len(stray(run_dir)) >= 5
    assert cli_in_process(capsys, monkeypatch, *sft_args(tiny, data, run_dir, 2))[0] == 0
    assert stray(tmp_path) == []


# --- 6. inputs refused before anything is allocated or started -----------------------------------------------------

SIZES = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings"]  # fmt: skip
BAD = st.one_of(
    st.integers(-(2**64), 0),
    st.integers(1, 2**70).map(lambda k: ("over", k)),  # that much above the field's bound
    st.sampled_from([2**40, -1, True, 1.5, "64", None, []]),
)


def bad_value(field: str, value):
    from draftopd.models.sizes import SIZE_BOUNDS

    return SIZE_BOUNDS[field] + value[1] if isinstance(value, tuple) else value


@settings(max_examples=80, **COMMON)
@given(field=st.sampled_from(SIZES), value=BAD)
@example(field="hidden_size", value=2**40)
@example(field="vocab_size", value=-1)
def test_target_config_sizes_are_bounded_before_loading(tiny, field, value):
    from draftopd.models.target import resolve_target_path

    cfg = json.loads((tiny / "config.json").read_text())
    value = bad_value(field, value)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg | {field: value}))
        if value is None:
            resolve_target_path(d)  # absent: nothing to check
            return
        t0 = time.perf_counter()
        with pytest.raises(DraftopdError) as e:
            resolve_target_path(d)
        assert "\n" not in str(e.value) and field in str(e.value) and time.perf_counter() - t0 < 1


@settings(max_examples=80, **COMMON)
@given(
    kind=st.sampled_from(["dflash", "eagle3"]),
    field=st.sampled_from([*SIZES, "draft_vocab_size", "num_target_layers", "block_size"]),
    value=BAD.filter(lambda v: v is not None),
)
@example(kind="dflash", field="intermediate_size", value=2**40)
@example(kind="eagle3", field="hidden_size", value=-64)
def test_drafter_config_sizes_are_bounded_before_anything_is_allocated(drafter, tmp_path_factory, kind, field, value):
    """``export`` (and every reader) of a drafter whose config.json sizes are huge or negative: one line, fast."""
    from draftopd.export import export_drafter

    if kind == "dflash":
        cfg = json.loads((drafter / "config.json").read_text())
    else:
        cfg = KINDS["eagle3"].to_hf(Eagle3Config(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_target_layers=4, vocab_size=49152, draft_vocab_size=64, target_layer_ids=(0, 1, 2),
        ))  # fmt: skip
    value = bad_value(field, value)
    if field == "block_size" and kind == "dflash":
        cfg["dflash_config"][field] = value
    else:
        cfg[field] = value
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(cfg))
        (src / "model.safetensors").write_bytes(b"")
        t0 = time.perf_counter()
        with pytest.raises(DraftopdError) as e:
            export_drafter(src, Path(d) / "out")
        assert "\n" not in str(e.value) and time.perf_counter() - t0 < 1, str(e.value)
        assert not (Path(d) / "out").exists()


def test_pickle_only_target_is_refused_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    target = tmp_path / "pickled"
    target.mkdir()
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, target / f.name)
    torch.save({"model.embed_tokens.weight": torch.zeros(2)}, target / "pytorch_model.bin")
    gen = ["generate", "--prompt", "hi", "--target", str(target), "--dtype", "fp32", "--max-new-tokens", "2"]
    one_line_error(capsys, monkeypatch, *gen, text="pytorch_model.bin")


@settings(max_examples=40, **COMMON)
@given(t=st.floats(min_value=0, max_value=1e-4, exclude_min=True, exclude_max=True))
@example(t=1e-300)
@example(t=5e-324)
def test_temperatures_below_1e_4_are_refused(t):
    from draftopd.config import GenerateConfig
    from draftopd.recipes import load

    with pytest.raises(DraftopdError, match=r"sampling.temperature must be 0 \(greedy\) or >= 0.0001"):
        load(GenerateConfig, None, [f"sampling.temperature={t!r}"])
    for ok in (0.0, 1e-4, 0.7):
        assert load(GenerateConfig, None, [f"sampling.temperature={ok}"]).sampling.temperature == ok


def test_empty_out_and_drafter_are_refused(tiny, drafter, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, monkeypatch, "demo", "--quick", "--out", "", text="--out ''")
    one_line_error(capsys, monkeypatch, "demo", "--quick", "--out", " ", text="--out ' '")
    one_line_error(capsys, monkeypatch, "data", "--target", str(tiny), "--out", "", text="--out ''")
    gen = ["generate", "--prompt", "hi", "--target", str(tiny), "--max-new-tokens", "2"]
    one_line_error(capsys, monkeypatch, *gen, "--drafter", "", text="--drafter ''")
    one_line_error(capsys, monkeypatch, "bench", "--target", str(tiny), "--drafter", "", text="--drafter ''")
    one_line_error(capsys, monkeypatch, "export", "", str(tmp_path / "x"), text="DRAFTER is empty")
    one_line_error(capsys, monkeypatch, "export", str(drafter), "", text="OUT is empty")
    one_line_error(capsys, monkeypatch, "train", "sft", "--set", "out=", text="out must be a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/demo-quick, nothing


@needs_default_target
def test_data_and_opd_check_the_context_window_before_starting(tiny, drafter, data, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello there."}) + "\n")
    traj = tmp_path / "traj"
    args = data_args(tiny, traj, prompts, "--max-new-tokens", "1020")  # the tiny target has 1024 positions
    one_line_error(capsys, monkeypatch, *args, text="context window of 1024")
    opd = [
        "train", "opd", "--target", str(tiny), "--dtype", "fp32", "--set", f"init_from={drafter}",
        "--set", f"out={tmp_path / 'opd'}", "--set", f"data={data}", "--set", "rollouts=live",
        "--set", "max_new_tokens=1020",
    ]  # fmt: skip
    one_line_error(capsys, monkeypatch, *opd, text="the longest prompt of")
    one_line_error(capsys, monkeypatch, *opd[:-1], "max_new_tokens=8", "--set", "eval.max_new_tokens=1020",
                   text="eval prompt")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_demo_and_bench_outputs_are_locked_and_fresh_refuses_a_link(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    with acquire(out, "demo"):
        one_line_error(capsys, monkeypatch, "demo", "--quick", "--out", str(out), text="in use by")
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    one_line_error(capsys, monkeypatch, "demo", "--quick", "--fresh", "--out", str(link), text="symbolic link")
    assert link.is_symlink() and real.is_dir()
    with acquire(tmp_path / "r.json", "bench"):
        one_line_error(capsys, monkeypatch, "bench", "--target", str(tmp_path / "none"), "--json",
                       str(tmp_path / "r.json"), text="in use by")  # fmt: skip


# --- 7. sweep, property-based ---------------------------------------------------------------------------------------


@settings(max_examples=60, **COMMON)
@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from(["part", "tmp", "old", "legacy", "user"]),
            st.sampled_from(["final", "shard_00000.pt", "x.json"]),
            st.sampled_from(["dead", "self", "alive"]),
            st.booleans(),  # whether the base name exists
        ),
        max_size=8,
    )
)
def test_sweep_removes_only_dead_writers_temporaries(entries):
    dead, alive = dead_pid(), os.getppid()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        expect_gone, expect_kept, restored = set(), set(), set()
        for i, (kind, base, who, base_exists) in enumerate(entries):
            pid = {"dead": dead, "self": os.getpid(), "alive": alive}[who]
            name = {
                "part": f".{base}.{pid}-{i:06x}.part",
                "tmp": f".{base}.tmp-{pid}-{i:06x}",
                "old": f".{base}.old-{pid}-{i:06x}",
                "legacy": "latest.part",
                "user": f"{base}.{i}.notes",
            }[kind]
            p = folder / name
            if p.exists():
                continue
            (p.mkdir() if kind in ("tmp", "old") else p.write_text("x"))
            if base_exists and not (folder / base).exists():
                (folder / base).write_text("kept")
            if kind == "user" or (kind != "legacy" and who == "alive"):
                expect_kept.add(name)
            elif kind == "old" and not (folder / base).exists() and base not in restored:
                restored.add(base)
            else:
                expect_gone.add(name)
        sweep(folder)
        names = {p.name for p in folder.iterdir()}
        assert expect_kept <= names and not (expect_gone & names) and restored <= names
