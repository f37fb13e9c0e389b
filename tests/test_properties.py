"""Property-based tests (hypothesis) of everything that reads user input before the work starts: the prompt and
conversation loaders, the config loader with dotted overrides, and the console script's argument handling.

For any input (empty, huge, invalid UTF-8, wrong types, NaN and negative numbers, folders where files are
expected) the result is either a valid value or a ``DraftopdError`` whose message is one line; nothing else is
raised and nothing is written. Example counts are fixed (``max_examples`` below; docs/RELIABILITY.md states
them) and the database is off, so a run is reproducible in time: about 10 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from draftopd import DraftopdError
from draftopd.cli import main
from draftopd.config import BenchConfig, DataConfig, DemoConfig, GenerateConfig, OPDConfig, SFTConfig
from draftopd.data.prompts import prompts_from_jsonl
from draftopd.recipes import load

LOADER_EXAMPLES, CONFIG_EXAMPLES, CLI_EXAMPLES = 150, 200, 120
COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}


def one_line(e: DraftopdError) -> None:
    msg = str(e)
    assert msg.strip() and "\n" not in msg and "Traceback" not in msg, msg


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- values a user can get wrong -------------------------------------------------------------------------------

TRICKY = st.sampled_from(
    [
        "", " ", "0", "-1", "-0.5", "nan", "NaN", ".nan", "inf", "-inf", ".inf", "1e-4", "1e999", "3", "0.5",
        "2", "1.5", "true", "null", "~", "[0.5", "[1, 2]", "{a: 1}", "[]", "{}", "gsm8k,bogus", "pld", "none",
        "x" * 5000, "1" * 5000, "é", "\x00", "'", '"', "!!python/object/apply:os.system ['true']",
    ]
)  # fmt: skip
KEYS = st.sampled_from(
    [
        "limit", "datasets", "batch_size", "warmup", "methods", "sampling.temperature", "sampling.top_p",
        "sampling.max_new_tokens", "sampling.seed", "target.threads", "target.dtype", "target.path",
        "drafter.kind", "drafter.num_tokens", "loop.max_steps", "loop.save_every", "max_len", "loop.lr", "lr", "loop",
        "arch.block_size", "chunk_size", "sources", "out", "eval.limit", "eval.dataset", "gamma", "logp_min", "bogus",
        "a.b.c", "sampling", "sampling.temperature.x", "", ".", "sampling.", "data.sampling.top_p",
        "sft.loop.max_steps",
    ]
)  # fmt: skip
OVERRIDES = st.lists(
    st.one_of(
        st.tuples(KEYS, TRICKY).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.tuples(KEYS, st.text(max_size=30)).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.text(max_size=40),
    ),
    max_size=5,
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


# --- 1. prompt and conversation loaders ------------------------------------------------------------------------

TURN = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "assistant", 3]), "content": JSON, "from": JSON, "value": JSON}
)
RECORD = st.one_of(
    st.fixed_dictionaries({"prompt": JSON}),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(TURN, max_size=3), JSON)}),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(TURN, max_size=3), JSON)}),
    st.dictionaries(st.text(max_size=8), JSON, max_size=3),
    JSON,
)
LINE = st.one_of(
    RECORD.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=60),  # arbitrary bytes: invalid JSON, invalid UTF-8
    st.text(max_size=60).map(str.encode),
)


@settings(max_examples=LOADER_EXAMPLES, **COMMON)
@given(lines=st.lists(LINE, max_size=6), limit=st.one_of(st.none(), st.integers(-2, 5)), gz=st.booleans())
@example(lines=[b'{"prompt": "caf\xe9"}'], limit=None, gz=False)  # Latin-1 in a prompt
@example(lines=[b'{"prompt": "' + b"x" * 1_000_000 + b'"}'], limit=None, gz=False)  # a 1 MB prompt
@example(lines=[b"[" * 100_000], limit=None, gz=False)  # nesting deeper than the parser's recursion
@example(lines=[b"1" * 5000], limit=None, gz=False)  # an integer past Python's digit limit
@example(lines=[b'{"messages": {"0": 1}}'], limit=None, gz=False)
@example(lines=[b"\x1f\x8b\x08 not gzip"], limit=None, gz=True)
def test_prompt_loader_returns_prompts_or_one_line(lines, limit, gz):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("p.jsonl.gz" if gz else "p.jsonl")
        body = b"\n".join(lines)
        if gz and not body.startswith(b"\x1f\x8b"):
            import gzip

            body = gzip.compress(body)
        path.write_bytes(body)
        try:
            out = prompts_from_jsonl(path, limit)
        except DraftopdError as e:
            one_line(e)
        else:
            assert out and all(isinstance(p, str) and p.strip() for p in out)
            assert limit is None or limit < 1 or len(out) <= limit
        assert files_under(Path(d)) == [path.name]


def test_prompt_loader_on_a_folder_or_nothing(tmp_path):
    for bad in (tmp_path, tmp_path / "missing.jsonl"):
        with pytest.raises(DraftopdError) as e:
            prompts_from_jsonl(bad)
        one_line(e.value)


# --- 2. the config loader with dotted overrides ----------------------------------------------------------------

CONFIG_TEXT = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.dictionaries(KEYS, JSON | TRICKY, max_size=5).map(lambda d: yaml.safe_dump(d).encode()),
    st.lists(JSON, max_size=3).map(lambda x: yaml.safe_dump(x).encode()),  # a top-level list
    TRICKY.map(lambda v: f"limit: {v}\n".encode()),
)
CLASSES = st.sampled_from([BenchConfig, GenerateConfig, DataConfig, SFTConfig, OPDConfig, DemoConfig])


@settings(max_examples=CONFIG_EXAMPLES, **COMMON)
@given(cls=CLASSES, text=st.one_of(st.none(), CONFIG_TEXT), overrides=OVERRIDES)
@example(cls=BenchConfig, text="limit: 3 # caf\xe9\n".encode("latin-1"), overrides=[])
@example(cls=BenchConfig, text=b"- a\n- b\n", overrides=[])
@example(cls=BenchConfig, text=None, overrides=["k=[0.5"])
@example(cls=BenchConfig, text=None, overrides=["sampling.temperature=nan"])
@example(cls=SFTConfig, text=None, overrides=["loop.save_every=0", "max_len=2"])
@example(cls=BenchConfig, text=b"limit: " + b"1" * 5000, overrides=[])
@example(cls=BenchConfig, text=None, overrides=["limit=" + "[" * 5000])
def test_config_loader_returns_a_config_or_one_line(cls, text, overrides):
    with tempfile.TemporaryDirectory() as d:
        path = None
        if text is not None:
            path = Path(d) / "recipe.yaml"
            path.write_bytes(text)
        try:
            cfg = load(cls, path, overrides)
        except DraftopdError as e:
            one_line(e)
        else:
            assert isinstance(cfg, cls)
        assert files_under(Path(d)) == ([] if path is None else ["recipe.yaml"])


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(DraftopdError) as e:
        load(BenchConfig, tmp_path)
    one_line(e.value)


# --- 3. the console script's argument handling -----------------------------------------------------------------

FLAGS = {
    "generate": ["--prompt", "--temperature", "--top-p", "--max-new-tokens", "--threads", "--drafter", "--dtype"],
    "bench": ["--datasets", "--limit", "--temperature", "--top-p", "--max-new-tokens", "--threads", "--drafter"],
    "data": ["--max-new-tokens", "--threads", "--dtype", "--out"],
    "train": ["--threads", "--dtype"],
    "demo": ["--quick", "--fresh"],
}


@st.composite
def argvs(draw):
    verb = draw(st.sampled_from(sorted(FLAGS)))
    argv = [verb] + (draw(st.sampled_from([["sft"], ["opd"], ["rl"]])) if verb == "train" else [])
    if verb == "generate":
        argv += ["--prompt", draw(st.one_of(TRICKY, st.text(max_size=50)))]
    for _ in range(draw(st.integers(0, 5))):
        flag = draw(st.sampled_from([*FLAGS[verb], "--set", "--config", "--gsm8k"]))
        if flag in ("--quick", "--fresh"):
            argv.append(flag)
            continue
        value = draw(
            st.one_of(TRICKY, st.text(max_size=20), st.sampled_from(["@file", "@folder", "@latin1", "@list"]))
        )
        if flag == "--set":
            value = draw(OVERRIDES.filter(bool))[0]
        argv += [flag, value]
    return argv


@pytest.fixture(scope="module")
def sandbox():
    """Input files and folders the arguments point at, and an empty working folder that must stay empty."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "cwd").mkdir()
        (root / "folder").mkdir()
        (root / "foreign").mkdir()
        (root / "foreign" / "precious.txt").write_text("keep me")
        (root / "file").write_text("limit: 3\n")
        (root / "latin1").write_bytes("limit: 3 # caf\xe9\n".encode("latin-1"))
        (root / "list").write_text("- 1\n- 2\n")
        yield root


@settings(max_examples=CLI_EXAMPLES, **COMMON)
@given(argv=argvs())
@example(argv=["generate", "--prompt", "hi", "--temperature", "nan"])
@example(argv=["bench", "--limit", "0"])
@example(argv=["bench", "--datasets", "gsm8k,bogus"])
@example(argv=["generate", "--prompt", "hi", "--threads", "-1"])
@example(argv=["demo", "--fresh"])
@example(argv=["data", "--out", "@file"])
@example(argv=["data"])  # the default out under the working folder: its lock's folders must go again
@example(argv=["train", "opd"])
@example(argv=["generate", "--prompt", "hi", "--config", "@folder"])
def test_cli_never_raises_and_writes_nothing(sandbox, argv):
    """Any argument list ends in exit status 0 or 2 with at most an ``error: ...`` line, never a traceback; no
    long job starts (the target is a missing folder and the demo's --out a folder it did not make, so each run
    stops at its checks) and nothing is written anywhere."""
    subst = {"@file": "file", "@folder": "folder", "@latin1": "latin1", "@list": "list"}
    argv = [str(sandbox / subst[a]) if a in subst else a for a in argv]
    verb = argv[0]
    if verb in ("generate", "bench", "data", "train"):
        argv += ["--target", str(sandbox / "no-such-model")]  # the last flag wins over --set target.path
    if verb == "demo":
        argv += ["--out", str(sandbox / "foreign")]
    before = files_under(sandbox)
    threads, env = torch.get_num_threads(), os.environ.get("DRAFTOPD_GSM8K")
    err, cwd = io.StringIO(), os.getcwd()
    os.chdir(sandbox / "cwd")
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: usage and one error line, status 2
                rc = e.code
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("DRAFTOPD_GSM8K", None)
        else:
            os.environ["DRAFTOPD_GSM8K"] = env
    text = err.getvalue()
    assert rc == 2, (argv, rc, text)  # every run here has a bad input: the missing target, at the least
    assert "Traceback" not in text, text
    errors = [ln for ln in text.splitlines() if "error:" in ln]
    assert len(errors) == 1, (argv, text)
    assert files_under(sandbox) == before, argv
