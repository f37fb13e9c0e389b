"""Reading JSON-lines files with errors that name the file and the line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from draftopd import DraftopdError


def read_jsonl(path: str | Path, limit: int | None = None) -> Iterator[dict]:
    """Yield one dict per non-empty line of a ``.jsonl`` (or ``.jsonl.gz``) file.

    A line that is not a JSON object raises ``DraftopdError("file:line: ...")``.
    """
    path = Path(path)
    if not path.is_file():
        raise DraftopdError(f"file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DraftopdError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DraftopdError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield row
            count += 1
            if limit is not None and count >= limit:
                return
