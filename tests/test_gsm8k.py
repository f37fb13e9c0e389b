"""GSM8K resolution: the shipped copy (no ../shared, no hub), the committed fixture, the hub option (faked)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from draftopd import DraftopdError
from draftopd.data import eval_sets as ds
from draftopd.data.eval_sets import MATH_TEMPLATE, gsm8k, gsm8k_file, load_prompts
from draftopd.data.prompts import load_training_prompts

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gsm8k"


def _first_question(file: Path) -> str:
    with open(file, encoding="utf-8") as f:
        return json.loads(f.readline())["question"]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """``$DRAFTOPD_GSM8K=hub`` with an empty home cache; returns the cache folder."""
    monkeypatch.setenv("DRAFTOPD_GSM8K", "hub")
    monkeypatch.setenv("DRAFTOPD_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "data" / "gsm8k"


def test_shipped_copy_needs_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $DRAFTOPD_GSM8K, an empty home, no hub: the copy shipped in the package serves both splits."""
    monkeypatch.delenv("DRAFTOPD_GSM8K", raising=False)
    monkeypatch.setenv("DRAFTOPD_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    shipped = Path(ds.__file__).resolve().parent / "gsm8k"
    assert gsm8k_file("train") == shipped / "train.jsonl.gz"
    assert gsm8k_file("test_dev") == shipped / "test_dev.jsonl.gz"
    assert len(gsm8k(split="train")) == 7473 and len(gsm8k(split="test_dev")) == 660
    assert load_prompts("gsm8k", 3) == gsm8k(3)
    assert load_training_prompts("gsm8k", 2) == gsm8k(2, split="train")
    assert gsm8k(1)[0].startswith("Janet’s ducks lay 16 eggs per day.")  # the first GSM8K test question
    notice = (shipped / "LICENSE").read_text(encoding="utf-8")
    assert "MIT License" in notice and "Copyright (c) 2021 OpenAI" in notice
    assert not (tmp_path / "home").exists()  # nothing fetched, nothing cached


def test_fixture_loads() -> None:
    assert gsm8k_file("train") == FIXTURE / "train.jsonl"
    dev = gsm8k(split="test_dev")
    assert len(dev) == 40
    assert dev[0] == MATH_TEMPLATE.format(problem=_first_question(FIXTURE / "test_dev.jsonl"))
    assert len(gsm8k(3, split="train")) == 3
    assert load_prompts("gsm8k", 2) == dev[:2]
    train = load_training_prompts("gsm8k", 5)
    assert len(train) == 5
    assert train[0] == MATH_TEMPLATE.format(problem=_first_question(FIXTURE / "train.jsonl"))


def test_single_file_serves_every_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAFTOPD_GSM8K", str(FIXTURE / "train.jsonl"))
    assert gsm8k_file("test_dev") == gsm8k_file("train") == FIXTURE / "train.jsonl"


def test_hub_unavailable_is_one_line(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DraftopdError) as e:
        gsm8k_file("test_dev")
    msg = str(e.value)
    assert "\n" not in msg
    for word in ("test_dev", "--gsm8k hub", "DRAFTOPD_GSM8K", "shipped", str(hub), "datasets"):
        assert word in msg, word


def test_shipped_copy_missing_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRAFTOPD_GSM8K", raising=False)
    monkeypatch.setattr(ds, "shipped_dir", lambda: tmp_path / "gone")
    with pytest.raises(DraftopdError, match="shipped .*gone/train.jsonl.gz is missing"):
        gsm8k_file("train")


def test_hub_download_is_cached(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, config: str) -> dict[str, list[dict]]:
        calls.append((name, config))
        rec = [{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(700)]
        return {"train": rec[:30], "test": rec}

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)

    assert gsm8k(split="test_dev") == [MATH_TEMPLATE.format(problem=f"q{i}") for i in range(660)]
    assert calls == [("openai/gsm8k", "main")]
    assert sorted(p.name for p in hub.iterdir()) == ["test_dev.jsonl", "train.jsonl"]  # no .part left
    with open(hub / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows[0] == {"question": "q0", "answer": "a0"} and len(rows) == 30

    monkeypatch.setitem(sys.modules, "datasets", None)  # the cache now serves without the hub
    assert len(load_training_prompts("gsm8k", None)) == 30
    assert calls == [("openai/gsm8k", "main")]


def test_failed_download_leaves_no_file(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a: {"train": [{"question": "q"}], "test": []}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DraftopdError, match="KeyError"):
        gsm8k_file("train")
    assert not list(hub.iterdir())


def test_missing_env_path_named_exactly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "x.jsonl"
    monkeypatch.setenv("DRAFTOPD_GSM8K", str(missing))
    with pytest.raises(DraftopdError) as e:
        gsm8k()
    assert f"{missing} does not exist" in str(e.value)
    assert "x.jsonl/" not in str(e.value)

    monkeypatch.setenv("DRAFTOPD_GSM8K", str(tmp_path))  # a folder without the split
    with pytest.raises(DraftopdError, match="test_dev.jsonl does not exist"):
        gsm8k()


def test_empty_file_and_bad_record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    monkeypatch.setenv("DRAFTOPD_GSM8K", str(empty))
    with pytest.raises(DraftopdError, match="no GSM8K records"):
        gsm8k()
    with pytest.raises(DraftopdError, match="no GSM8K records"):
        load_training_prompts("gsm8k", 5)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "1"}\n', encoding="utf-8")
    monkeypatch.setenv("DRAFTOPD_GSM8K", str(bad))
    with pytest.raises(DraftopdError, match="record 1 has no 'question' field"):
        gsm8k()


def test_unknown_split() -> None:
    with pytest.raises(DraftopdError, match="unknown GSM8K split"):
        gsm8k_file("test")
