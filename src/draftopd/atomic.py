"""Writing files so that nothing half-written is ever left under the real name, and checking output paths
before any work is done.

``write_text(path, text)`` writes ``<dir>/.<name>.<pid>.part``, flushes it to disk and renames it over
``path`` (a rename within one folder is atomic): a reader, or a run killed at any moment, sees the old file
or the new one, never a mix. ``replacing(path)`` does the same for writers that want a path (``savefig``,
``torch.save``). ``check_output_file`` / ``check_output_dir`` turn an output location that cannot work (a
folder where a file is wanted, a file where a folder is wanted, an unwritable parent) into a one-line
``DraftopdError`` before the long job starts.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from draftopd import DraftopdError


def _part(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.part")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on failure removed."""
    path = Path(path)
    tmp = _part(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def write_json(path: str | Path, obj: object, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))


def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | Path, what: str) -> None:
    """One-line error unless ``path`` is (or can be made) a writable folder."""
    try:
        _check_output_dir(Path(path), what)
    except OSError as e:  # e.g. a name longer than the file system allows
        raise DraftopdError(f"{what} {str(path)[:80]}: {e.strerror or e}") from None


def _check_output_dir(path: Path, what: str) -> None:
    if not str(path).strip():
        raise DraftopdError(f"{what}: an empty path is not a folder")
    if path.exists() and not path.is_dir():
        raise DraftopdError(f"{what} {path} is a file, not a folder")
    base = _first_existing(path)
    if not base.is_dir():
        raise DraftopdError(f"{what} {path}: {base} is a file, so no folder can be made there")
    if not os.access(base, os.W_OK | os.X_OK):
        raise DraftopdError(f"{what} {path}: {base} is not writable")


def check_output_file(path: str | Path, what: str) -> None:
    """One-line error unless a file can be written at ``path`` (not a folder; its folder can be made)."""
    path = Path(path)
    if not str(path).strip() or path.name in ("", ".", ".."):
        raise DraftopdError(f"{what}: {str(path)!r} is not a file name")
    if len(os.fsencode(path.name)) > 255:
        raise DraftopdError(f"{what} {str(path)[:80]}...: file name too long")
    if path.is_dir():
        raise DraftopdError(f"{what} {path} is a folder: give a file name")
    check_output_dir(path.parent, what)
