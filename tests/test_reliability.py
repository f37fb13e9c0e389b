"""Issue 14, "nothing lost, nothing executed": a test per finding. Crafted pickles run no code, destructive
flags touch only what the tool made, output locations are checked before the work, the data manifest notices
changed prompts, and each hostile input of the issue ends in one line on stderr with exit status 2.

The CLI is called in-process (``draftopd.cli.main``) on a tiny random target with SmolLM2's tokenizer, so the
whole file runs in well under a minute. docs/RELIABILITY.md lists what holds and which test shows it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import cli_in_process, needs_default_target, one_line_error


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n" for i in range(5)))
    return path


@pytest.fixture(scope="module")
def traj(tmp_path_factory) -> Path:
    """A trajectory folder (what `draftopd data` writes) for OPD to draw its rows from."""
    out = tmp_path_factory.mktemp("traj")
    rows = [{"prompt": [1, 2, 3, 4], "response": [5, 6, 7, 8, 9]}, {"prompt": [1, 2], "response": [7, 8, 9, 10]}]
    torch.save(rows, out / "shard_00000.pt")
    return out


class Payload:
    """Unpickling this calls ``os.system``: a crafted checkpoint's way to run code."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


def crafted_checkpoint(drafter: Path, where: Path, proof: Path) -> Path:
    """A drafter folder whose ``training_state.pt`` would write ``proof`` when unpickled unsafely."""
    shutil.copytree(drafter, where)
    torch.save({"optimizer": Payload(proof), "step": 1}, where / "training_state.pt")
    return where


def opd_args(tiny: Path, data: Path, out: Path, init_from: Path) -> list[str]:
    return [
        "train", "opd", "--target", str(tiny), "--dtype", "fp32",
        "--set", f"init_from={init_from}", "--set", f"out={out}", "--set", f"data={data}",
        "--set", "loop.max_steps=1", "--set", "rollout_batch=2", "--set", "max_new_tokens=8",
        "--set", "eval.limit=1", "--set", "eval.max_new_tokens=4",
    ]  # fmt: skip


# --- 1. nothing executed ------------------------------------------------------------------------------------


def test_crafted_init_from_runs_no_code(tiny, drafter, traj, tmp_path, capsys, monkeypatch):
    """init_from a checkpoint whose training_state.pt carries a pickle payload: the payload never runs."""
    proof = tmp_path / "pwned"
    evil = crafted_checkpoint(drafter, tmp_path / "evil", proof)
    try:
        rc = cli_in_process(capsys, monkeypatch, *opd_args(tiny, traj, tmp_path / "opd", evil))[0]
    except Exception as e:  # noqa: BLE001 - whether it fails in one line is the next test's question
        rc = e
    assert not proof.exists(), "the crafted checkpoint ran code"
    assert rc != 0


def test_crafted_init_from_is_a_one_line_error(tiny, drafter, traj, tmp_path, capsys, monkeypatch):
    proof = tmp_path / "pwned"
    evil = crafted_checkpoint(drafter, tmp_path / "evil", proof)
    one_line_error(capsys, monkeypatch, *opd_args(tiny, traj, tmp_path / "opd", evil), text="training_state.pt")
    assert not proof.exists()


def test_crafted_resume_checkpoint_runs_no_code(tiny, drafter, traj, tmp_path, capsys, monkeypatch):
    """The resume path: a crafted checkpoint planted as the run's latest is refused in one line, unexecuted."""
    from draftopd.config import OPDConfig
    from draftopd.recipes import load, to_dict

    out, proof = tmp_path / "opd", tmp_path / "pwned"
    args = opd_args(tiny, traj, out, drafter)
    cfg = load(OPDConfig, None, [a for a in args[2:] if "=" in a] + [f"target.path={tiny}", "target.dtype=fp32"])
    crafted_checkpoint(drafter, out / "checkpoints" / "step_000001", proof)
    cfg = cfg.for_kind("dflash")  # what the run records: the recipe of its drafter kind filled in
    (out / "checkpoints" / "step_000001" / "run_config.json").write_text(json.dumps(to_dict(cfg)))
    (out / "checkpoints" / "latest").write_text("step_000001")
    one_line_error(capsys, monkeypatch, *args, text="not a training state")
    assert not proof.exists()


def test_crafted_trajectory_shard_runs_no_code(tmp_path):
    from draftopd import DraftopdError
    from draftopd.data.trajectories import load_shards

    proof = tmp_path / "pwned"
    torch.save([Payload(proof)], tmp_path / "shard_00000.pt")
    with pytest.raises(DraftopdError, match="shard_00000.pt: not a trajectory shard"):
        load_shards(tmp_path)
    assert not proof.exists()


def test_every_torch_load_in_src_is_weights_only():
    src = Path(__file__).resolve().parents[1] / "src"
    calls = [
        (f, line)
        for f in src.rglob("*.py")
        for line in f.read_text().splitlines()
        if "torch.load(" in line and not line.lstrip().startswith("#")
    ]
    assert calls
    assert all("weights_only=True" in line for _, line in calls), [c for c in calls if "weights_only=True" not in c[1]]


# --- 2. nothing destroyed that the tool did not make ---------------------------------------------------------


def test_demo_fresh_refuses_a_folder_it_did_not_make(tmp_path, capsys, monkeypatch):
    foreign = tmp_path / "runs"
    (foreign / "precious").mkdir(parents=True)
    (foreign / "precious" / "weights.bin").write_bytes(b"hours of training")
    one_line_error(capsys, monkeypatch, "demo", "--quick", "--fresh", "--out", str(foreign), text="not made by")
    assert (foreign / "precious" / "weights.bin").read_bytes() == b"hours of training"
    one_line_error(capsys, monkeypatch, "demo", "--quick", "--out", str(foreign), text="not made by")  # nor without
    assert sorted(p.name for p in foreign.iterdir()) == ["precious"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(capsys, monkeypatch, "demo", "--quick", "--fresh", "--out", str(afile), text="is a file")
    assert afile.read_text() == "x"


def test_demo_marks_the_folder_it_makes_and_fresh_removes_only_that(tmp_path):
    from draftopd.demo import MARKER, claim

    out = tmp_path / "demo"
    claim(out, fresh=False)  # made by the demo: marked
    assert (out / MARKER).is_file()
    (out / "sft").mkdir()
    claim(out, fresh=False)  # resumed: kept
    assert (out / "sft").is_dir()
    claim(out, fresh=True)  # --fresh on its own folder: emptied and marked again
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    claim(empty, fresh=True)  # an empty folder (e.g. a fresh temp dir) is taken
    assert (empty / MARKER).is_file()
    assert not list(tmp_path.glob("**/.*.part"))  # the marker was written atomically


# --- 3. outputs checked before the work ----------------------------------------------------------------------


def bench_args(tiny: Path, *extra: str) -> list[str]:
    return [
        "bench", "--target", str(tiny), "--dtype", "fp32", "--datasets", "mtbench", "--limit", "1",
        "--max-new-tokens", "2", "--set", "hf_baseline=false", "--set", "warmup=0", *extra,
    ]  # fmt: skip


def test_bench_outputs_are_checked_before_the_run(tiny, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    one_line_error(capsys, monkeypatch, *bench_args(tiny, "--json", str(folder)), text="is a folder")
    one_line_error(capsys, monkeypatch, *bench_args(tiny, "--plot", str(tmp_path / "x.xyz")), text="xyz")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(capsys, monkeypatch, *bench_args(tiny, "--json", str(afile / "r.json")), text="is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder", "afile"]  # no stray .part
    assert not list(folder.iterdir())
    # a good run writes both, and prints the table before the machine-readable last line
    rc, out, _ = cli_in_process(
        capsys,
        monkeypatch,
        *bench_args(tiny, "--json", str(tmp_path / "r" / "r.json"), "--plot", str(tmp_path / "r.svg")),
    )
    assert rc == 0 and out.splitlines()[0].startswith("dataset") and json.loads(out.splitlines()[-1])["datasets"]
    assert json.loads((tmp_path / "r" / "r.json").read_text())["datasets"]["mtbench"]["prompts"] == 1
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")
    assert not list(tmp_path.glob("**/.*.part"))


def test_bench_fails_on_a_bad_data_set_before_any_runs(tiny, tmp_path, capsys, monkeypatch):
    line = one_line_error(capsys, monkeypatch, *bench_args(tiny, "--datasets", "mtbench,bogus"), text="bogus")
    assert "datasets" in line
    rc, out, err = cli_in_process(
        capsys, monkeypatch, *bench_args(tiny, "--datasets", "mtbench,gsm8k", "--gsm8k", "/nope.jsonl")
    )
    assert rc == 2 and "/nope.jsonl does not exist" in err and "mtbench" not in out  # mtbench never ran
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(
        capsys, monkeypatch, *bench_args(tiny, "--datasets", "gsm8k", "--gsm8k", str(empty)), text="no GSM8K"
    )
    missing = tmp_path / "x.jsonl"
    line = one_line_error(capsys, monkeypatch, *bench_args(tiny, "--datasets", "gsm8k", "--gsm8k", str(missing)))
    assert f"{missing} does not exist" in line and "test_dev" not in line


# --- 4. data provenance --------------------------------------------------------------------------------------


def test_data_manifest_notices_changed_prompts_not_threads(tiny, tmp_path, capsys, monkeypatch):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(4)))
    out = tmp_path / "traj"
    args = ["data", "--target", str(tiny), "--dtype", "fp32", "--max-new-tokens", "4", "--out", str(out)]
    args += ["--set", f"sources=[{src}]", "--set", "chunk_size=2"]
    assert cli_in_process(capsys, monkeypatch, *args)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["prompts_sha256"]) == 64 and "threads" not in manifest["settings"]
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.pt")}
    assert len(shards) == 2
    # another thread count: same output, accepted, nothing regenerated
    assert cli_in_process(capsys, monkeypatch, *args, "--set", "target.threads=1")[0] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.pt")} == shards
    # batch size does not change greedy fp32 output either
    assert cli_in_process(capsys, monkeypatch, *args, "--set", "batch_size=3")[0] == 0
    # same path, same count, other content: refused, the old shards untouched
    src.write_text("".join(json.dumps({"prompt": f"Spell {i}."}) + "\n" for i in range(4)))
    one_line_error(capsys, monkeypatch, *args, text="trajectories of other prompts")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.pt")} == shards
    # a fresh folder for the new prompts works; a setting that changes the output is named
    assert cli_in_process(capsys, monkeypatch, *args, "--out", str(tmp_path / "new"))[0] == 0  # the last --out wins
    new = ["--out", str(tmp_path / "new"), "--max-new-tokens", "5"]
    one_line_error(capsys, monkeypatch, *args, *new, text="max_new_tokens 4 -> 5")
    assert not list(tmp_path.glob("**/.*.part"))


# --- 5. one-line errors for hostile input --------------------------------------------------------------------


@needs_default_target
def test_hostile_inputs_end_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    gen = ["generate", "--prompt", "hi", "--target", str(tiny), "--dtype", "fp32", "--max-new-tokens", "2"]
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    data = ["data", "--target", str(tiny), "--dtype", "fp32", "--out", str(tmp_path / "traj")]
    one_line_error(capsys, monkeypatch, *data, "--set", f"sources=[{bad_utf8}]", text=f"{bad_utf8}:2: not UTF-8")
    one_line_error(capsys, monkeypatch, *gen, "--temperature", "nan", text="sampling.temperature")
    one_line_error(capsys, monkeypatch, *gen, "--temperature", "-1", text="sampling.temperature")
    one_line_error(capsys, monkeypatch, *gen, "--top-p", "1.5", text="sampling.top_p")
    one_line_error(capsys, monkeypatch, *gen, "--max-new-tokens", "0", text="sampling.max_new_tokens")
    one_line_error(capsys, monkeypatch, *gen, "--threads", "-1", text="target.threads")
    listed = tmp_path / "list.yaml"
    listed.write_text("- limit\n- 3\n")
    one_line_error(capsys, monkeypatch, *gen, "--config", str(listed), text="expected a mapping")
    one_line_error(capsys, monkeypatch, *gen, "--config", str(tmp_path), text="is not a file")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("limit: 3\n# caf\xe9\n".encode("latin-1"))
    one_line_error(capsys, monkeypatch, *gen, "--config", str(latin), text="latin.yaml:2: not UTF-8")
    one_line_error(capsys, monkeypatch, *gen, "--set", "k=[0.5", text="invalid YAML value")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(capsys, monkeypatch, "data", "--target", str(tiny), "--out", str(afile), text="is a file")
    sft = ["train", "sft", "--target", str(tiny)]
    one_line_error(capsys, monkeypatch, *sft, "--set", "loop.save_every=0", text="loop.save_every")
    one_line_error(capsys, monkeypatch, *sft, "--set", "max_len=2", text="max_len")
    one_line_error(capsys, monkeypatch, *sft, "--set", "arch.block_size=1", text="arch.block_size")
    one_line_error(capsys, monkeypatch, *bench_args(tiny, "--limit", "0"), text="limit must be >= 1")
    assert afile.read_text() == "x" and not (tmp_path / "traj").exists()


def test_drafter_config_without_hidden_size(tiny, drafter, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "d"
    shutil.copytree(drafter, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    gen = ["generate", "--prompt", "hi", "--target", str(tiny), "--dtype", "fp32", "--max-new-tokens", "2"]
    one_line_error(capsys, monkeypatch, *gen, "--drafter", str(broken), text="hidden_size")


def test_truncated_safetensors(tiny, drafter, tmp_path, capsys, monkeypatch):
    gen = ["generate", "--prompt", "hi", "--dtype", "fp32", "--max-new-tokens", "2"]
    cut = tmp_path / "cut-drafter"
    shutil.copytree(drafter, cut)
    (cut / "model.safetensors").write_bytes((drafter / "model.safetensors").read_bytes()[:1000])
    one_line_error(capsys, monkeypatch, *gen, "--target", str(tiny), "--drafter", str(cut), text="model.safetensors")
    target = tmp_path / "cut-target"
    shutil.copytree(tiny, target)
    whole = (tiny / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    one_line_error(capsys, monkeypatch, *gen, "--target", str(target), text="model.safetensors")
