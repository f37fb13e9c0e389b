"""Reading JSON-lines files with errors that name the file and the line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from draftopd import DraftopdError


def read_jsonl(path: str | Path, limit: int | None = None) -> Iterator[dict]:
    """Yield one dict per non-empty line of a ``.jsonl`` (or ``.jsonl.gz``) file, at most ``limit``.

    Anything that is not a JSON object per line (invalid JSON, invalid UTF-8, a broken gzip stream) raises
    ``DraftopdError("file:line: ...")``.
    """
    path = Path(path)
    if not path.is_file():
        raise DraftopdError(f"file not found: {path}" if not path.exists() else f"{path} is not a file")
    if limit is not None and limit < 1:
        return
    opener = gzip.open if path.suffix == ".gz" else open
    count, lineno = 0, 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DraftopdError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                except (ValueError, RecursionError) as e:  # e.g. a 5000-digit integer, nesting 10^5 deep
                    raise DraftopdError(f"{path}:{lineno}: invalid JSON ({type(e).__name__})") from None
                if not isinstance(row, dict):
                    raise DraftopdError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield row
                count += 1
                if limit is not None and count >= limit:
                    return
    except UnicodeDecodeError as e:
        line = _bad_utf8_line(path, opener) or lineno + 1
        raise DraftopdError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut .gz ends in EOFError
        raise DraftopdError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _bad_utf8_line(path: Path, opener) -> int | None:
    """The first line of ``path`` that is not valid UTF-8 (the text reader decodes ahead, in chunks)."""
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None
