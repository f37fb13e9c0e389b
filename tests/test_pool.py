"""The committed trajectory pool (issue 35): the compact u16.xz shard is byte-deterministic and round-trips through
``load_shards``; ``draftopd data --set shard_format=u16`` records each shard's sha256 and machine, resumes, and makes
a shard again to the same bytes (``regenerate_shard``, what scripts/pool_verify.py runs); a pool folder of several
sources loads as one; pool B's committed GSM8K-train list is the seeded rule's and disjoint from pool A; the MBPP
code prompts share no function name with HumanEval. Tiny targets only: no real-target generation here."""

from __future__ import annotations

import json
import lzma
import random
import re
import shutil

import pytest

from draftopd import DraftopdError
from draftopd.data import shardfile
from draftopd.data.prompts import gsm8k_pool, gsm8k_train, load_training_prompts, mbpp, pool_b_indices
from draftopd.data.trajectories import load_shards, regenerate_shard

from helpers import cli_in_process, one_line_error

ROWS = [
    {"source": "gsm8k_b", "prompt": [1, 2, 3], "response": [4, 5, 65535, 0]},
    {"source": "mbpp", "prompt": [49151], "response": []},
    {"source": "gsm8k_b", "prompt": [], "response": [7] * 300},
]


def test_shard_bytes_are_deterministic_and_round_trip(tmp_path):
    data = shardfile.dumps(ROWS)
    assert data == shardfile.dumps([dict(r) for r in ROWS])  # no timestamp, no name: same rows, same bytes
    assert shardfile.loads(data) == ROWS
    rec = shardfile.record(data)
    assert rec["rows"] == 3 and rec["prompt_tokens"] == 4 and rec["response_tokens"] == 304
    assert rec["sha256"] == shardfile.sha256(data) and rec["bytes"] == len(data)
    (tmp_path / "shard_00000.u16.xz").write_bytes(data)
    assert load_shards(tmp_path) == ROWS
    with pytest.raises(DraftopdError, match="does not fit the u16.xz"):
        shardfile.dumps([{"source": "x", "prompt": [65536], "response": []}])


def test_damaged_or_replaced_shards_are_one_line_errors(tmp_path):
    data = shardfile.dumps(ROWS)
    f = tmp_path / "shard_00000.u16.xz"
    f.write_bytes(data[:-9])
    with pytest.raises(DraftopdError, match="shard_00000.u16.xz: not a trajectory shard"):
        load_shards(tmp_path)
    payload = lzma.decompress(data)
    f.write_bytes(shardfile.compress(payload[:-2]))  # ids cut short: lengths do not match
    with pytest.raises(DraftopdError, match="lengths do not match"):
        load_shards(tmp_path)
    # a valid shard that is not the one the manifest records
    f.write_bytes(shardfile.dumps(ROWS[:1]))
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": {f.name: {"sha256": shardfile.sha256(data)}}}))
    with pytest.raises(DraftopdError, match="its sha256 is not the one its manifest records"):
        load_shards(tmp_path)


def test_pool_b_is_the_seeded_rule_and_disjoint_from_a(monkeypatch):
    with pytest.raises(DraftopdError, match="pool B's indices are of GSM8K train's 7473"):
        gsm8k_pool("b")  # the suite's 40-record fixture is not GSM8K train
    monkeypatch.delenv("DRAFTOPD_GSM8K")  # the shipped split
    b = pool_b_indices()
    assert b == sorted(random.Random(35).sample(range(7473), 2000))
    train = gsm8k_train()
    pool_a, pool_b = gsm8k_pool("a"), gsm8k_pool("b")
    assert len(pool_b) == 2000 and len(pool_a) == 5473
    assert pool_b == [train[i] for i in b] and not set(pool_a) & set(pool_b)
    assert load_training_prompts("gsm8k_b", 3) == pool_b[:3]


def test_mbpp_prompts_share_nothing_with_humaneval():
    from draftopd.data.eval_sets import humaneval

    prompts = mbpp()
    assert len(prompts) == 387 and all("```python" in p for p in prompts)
    try:
        he = humaneval()
    except DraftopdError:
        pytest.skip("HumanEval not set up")
    names = {m for p in he for m in re.findall(r"def (\w+)\(", p)}
    assert not {m for p in prompts for m in re.findall(r"def (\w+)\(", p)} & names


def test_data_u16_records_resumes_and_regenerates_the_same_bytes(tiny, tmp_path, capsys, monkeypatch):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 1}."}) + "\n" for i in range(5)))
    pool = tmp_path / "pool"
    out = pool / "one"
    args = ["data", "--target", str(tiny), "--dtype", "fp32", "--max-new-tokens", "6", "--out", str(out)]
    args += ["--set", f"sources=[{src}]", "--set", "chunk_size=2", "--set", "batch_size=2"]
    args += ["--set", "shard_format=u16"]
    assert cli_in_process(capsys, monkeypatch, *args)[0] == 0
    names = sorted(p.name for p in out.glob("shard_*"))
    assert names == [f"shard_0000{i}.u16.xz" for i in range(3)]
    text = (out / "manifest.json").read_text()
    m = json.loads(text)
    assert text == json.dumps(m, indent=2, sort_keys=True) + "\n"  # sorted keys: it diffs well
    assert m["settings"]["shard_format"] == "u16" and len(m["settings"]["target_sha256"]) == 64
    assert m["target"]["weights_sha256"] == m["settings"]["target_sha256"]
    assert m["sources"][str(src)]["prompts"] == 5 and m["totals"]["rows"] == 5 and m["totals"]["shards"] == 3
    (machine,) = m["machines"]
    assert m["machines"][machine]["dtype"] == "float32" and m["machines"][machine]["batch_size"] == 2
    for name in names:
        rec = m["shards"][name]
        assert rec["sha256"] == shardfile.sha256((out / name).read_bytes()) and rec["machine"] == machine
    rows = load_shards(out)
    assert len(rows) == 5 and all(r["source"] == str(src) and r["response"] for r in rows)
    # a killed run: one shard gone; the rerun makes it again, to the same bytes
    before = (out / names[1]).read_bytes()
    (out / names[1]).unlink()
    assert cli_in_process(capsys, monkeypatch, *args)[0] == 0
    assert (out / names[1]).read_bytes() == before and json.loads((out / "manifest.json").read_text())["shards"]
    # a pt rerun of a u16 folder is refused, naming the setting
    one_line_error(capsys, monkeypatch, *args, "--set", "shard_format=pt", text="shard_format 'u16' -> None")
    # regenerate_shard (scripts/pool_verify.py): the same bytes from the manifest alone
    res = regenerate_shard(out, names[2], tmp_path / "again")
    assert (
        res["same"]
        and res["same_payload"]
        and (tmp_path / "again" / names[2]).read_bytes() == (out / names[2]).read_bytes()
    )
    # a pool folder of several data folders loads as their union, in folder order
    shutil.copytree(out, pool / "two")
    assert load_shards(pool) == rows + rows


def test_sharegpt_prompts_are_each_text_once():
    """The dump repeats first turns ("hi"); pool A's ShareGPT folder asks the target each text once."""
    from draftopd import DraftopdError
    from draftopd.data import prompts

    try:
        turns = prompts.sharegpt()
    except DraftopdError as e:  # the wheel's dump is unpacked by `draftopd setup`
        pytest.skip(f"ShareGPT not set up: {e}")
    assert len(turns) == len(set(turns)) > 8000
    assert turns[:5] == prompts.sharegpt(5)
