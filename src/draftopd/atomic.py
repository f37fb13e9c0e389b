"""Writing files so that nothing half-written is ever left under the real name, and checking output paths
before any work is done.

``write_text(path, text)`` writes ``<dir>/.<name>.<pid>-<tag>.part`` (``tag``: random, so no two writers share
a name), flushes it to disk and renames it over ``path`` (a rename within one folder is atomic): a reader, or a
run killed at any moment, sees the old file or the new one, never a mix. ``replacing(path)`` does the same for
writers that want a path (``savefig``, ``torch.save``); ``atomic_folder(folder)`` for a whole folder
(``.<name>.tmp-<pid>-<tag>``, renamed). Whatever a writer raises on the way (``OSError`` such as ENOSPC, EIO or
EACCES, torch's ``RuntimeError``, safetensors' ``SafetensorError``) becomes a one-line ``DraftopdError``
naming the file, and the temporary is removed. What a killed writer leaves, ``owner.sweep`` removes.
``check_output_file`` / ``check_output_dir`` turn an output location that cannot work (a
folder where a file is wanted, a file where a folder is wanted, an unwritable parent) into a one-line
``DraftopdError`` before the long job starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from draftopd import DraftopdError


def _tag() -> str:
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def _part(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_tag()}.part")


def write_failure(path: str | Path, e: BaseException) -> DraftopdError:
    """A writer's failure as one line naming ``path`` (torch and safetensors do not say why: a full disk is
    named when the disk is full)."""
    if isinstance(e, OSError):
        why = e.strerror or str(e) or type(e).__name__
    else:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = (lines[0] if lines else type(e).__name__).split("] ", 1)[-1].strip(" .") or type(e).__name__
        why = f"the write failed ({first}): check free space, quotas and the device"
        with contextlib.suppress(OSError):
            if shutil.disk_usage(_existing(Path(path).parent)).free < 1 << 20:
                why = f"No space left on device ({why})"
    return DraftopdError(f"cannot write {path}: {why}")


def _existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a writer's failure inside the block into a one-line ``DraftopdError`` naming ``path``."""
    try:
        yield
    except DraftopdError:
        raise
    except (OSError, RuntimeError, SafetensorError) as e:
        raise write_failure(path, e) from None


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on failure removed."""
    path = Path(path)
    tmp = _part(path)
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(folder: str | Path, keep_others: bool = True) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary sibling to fill, then renames it to ``folder``. An existing
    ``folder`` is replaced; with ``keep_others`` its files that the new folder does not write are carried over.
    On an error the temporary folder is removed and ``folder`` is left as it was (one line naming it)."""
    folder = Path(folder)
    tag = _tag()
    tmp = folder.parent / f".{folder.name}.tmp-{tag}"
    old = folder.parent / f".{folder.name}.old-{tag}"
    try:
        with writing(folder):
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            yield tmp
            if folder.exists() or folder.is_symlink():
                if keep_others and folder.is_dir():
                    for f in folder.iterdir():
                        if not (tmp / f.name).exists():
                            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
                folder.rename(old)
                tmp.rename(folder)
                _remove(old)
            else:
                tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def write_json(path: str | Path, obj: object, indent: int | None = 2, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + ("\n" if indent is not None else ""))


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
