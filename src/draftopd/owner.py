"""One owner per output: an exclusive lock per output folder (or file), and the sweep of what a killed owner
left behind.

``owning(path, what)`` holds the lock for as long as a verb writes ``path``: ``data`` its trajectory folder,
``train`` its run folder, ``export`` its OUT, ``demo`` its folder, ``bench`` its ``--json`` and ``--plot``
files. The lock is a sibling file ``.<name>.lock`` locked with ``flock`` and holding the owner's pid and verb.
The kernel drops a ``flock`` when its process ends, however it ends (kill -9 included): a lock file left by a
dead process is free, and the next owner takes it over. A second process that finds the lock taken stops with
one line naming the holder's pid. The owner removes the file on release while still holding it; a process
that locked a file checks that it is still the one at the path (else it was just removed: try again), so a
released lock is never held twice.

``sweep(folder)`` removes the temporary names the writers of ``atomic.py`` use (``.<name>.<pid>-<tag>.part``
files, ``.<name>.tmp-<pid>-<tag>`` folders) and the fixed ones of older releases (``step_NNNNNN.part``,
``latest.part``, ``features.part``), when the process that made them is gone: what a run killed with -9 leaves.
A ``.<name>.old-<pid>-<tag>`` folder (the previous ``<name>`` during the two renames that replace it) is put
back as ``<name>`` when ``<name>`` is missing (a kill between the renames), else removed. Each owner sweeps
only the folders it owns, after taking the lock, so it never removes what a live writer is making.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from draftopd import DraftopdError

log = logging.getLogger(__name__)

PART = re.compile(r"^\.(?P<base>.+)\.(?P<pid>\d+)(?:-[0-9a-f]+)?\.part$")
FOLDER = re.compile(r"^\.(?P<base>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
LEGACY = re.compile(r"^(?P<base>step_\d{6}|latest|features)\.part$")  # fixed names of earlier releases


def lock_file(path: str | Path) -> Path:
    """The lock of an output: ``.<name>.lock`` beside it (its folder resolved, so two spellings share it)."""
    p = Path(os.path.abspath(path))
    parent = p.parent.resolve() if p.parent.exists() else p.parent
    return parent / f".{p.name}.lock"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(lock: Path) -> str:
    """Who holds ``lock``, from the pid and verb it wrote (a moment after locking: retried briefly)."""
    for _ in range(20):
        try:
            text = lock.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        if text:
            pid, _, what = text.partition(" ")
            return f"pid {pid}" + (f", `draftopd {what}`" if what else "")
        time.sleep(0.05)
    return "pid unknown"


class OutputLock:
    """A held lock; ``release()`` (or leaving the ``with`` block) removes the lock file and unlocks it."""

    def __init__(self, path: Path, fd: int, made: list[Path] | None = None) -> None:
        self.path, self.fd, self.made = path, fd, made or []  # made: the folders acquire() created, deepest first

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)  # while still locked: the next owner then makes a new file
        except OSError:
            pass
        finally:
            os.close(fd)
        for d in self.made:  # a run that wrote nothing leaves no empty folders behind it
            try:
                d.rmdir()
            except OSError:
                break  # not empty (the run wrote there) or gone: its parents stay too

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lock dropped on an error path is released with its object
        with contextlib.suppress(Exception):
            self.release()


def acquire(path: str | Path, what: str) -> OutputLock:
    """Lock output ``path`` for this process, or a one-line ``DraftopdError`` naming the holder's pid."""
    lock = lock_file(path)
    made = [d for d in [lock.parent, *lock.parent.parents] if not d.exists()]  # deepest first
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise DraftopdError(
                        f"{path} is in use by another draftopd process ({_holder(lock)}): wait for it to end, "
                        "or choose another output"
                    ) from None
                raise
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its owner removed it as we locked it: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {what}\n".encode())
            return OutputLock(lock, fd, made)
    except OSError as e:
        raise DraftopdError(f"cannot lock {path} ({lock}): {e.strerror or e}") from None
    raise DraftopdError(f"cannot lock {path}: its lock file {lock} keeps changing")


@contextlib.contextmanager
def owning(path: str | Path, what: str, sweep_inside: bool = True) -> Iterator[OutputLock]:
    """Hold the lock of output ``path`` for the block; first sweep what killed runs left (beside ``path``
    under its name, and inside it when it is a folder and ``sweep_inside``)."""
    with acquire(path, what) as held:
        p = Path(path)
        sweep(p.parent, only=p.name)
        if sweep_inside and p.is_dir() and not p.is_symlink():
            sweep(p)
        yield held


def sweep(folder: str | Path, only: str | None = None) -> list[Path]:
    """Remove the temporary files and folders of dead writers in ``folder`` (``only``: those of that name);
    returns what was removed or restored."""
    folder = Path(folder)
    done: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return done
    for p in entries:
        m = PART.match(p.name) or FOLDER.match(p.name) or LEGACY.match(p.name)
        if not m or (only is not None and m["base"] != only):
            continue
        pid = int(m["pid"]) if "pid" in m.groupdict() else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        base = folder / m["base"]
        try:
            if m.groupdict().get("kind") == "old" and not base.exists() and not base.is_symlink():
                p.rename(base)  # killed between the renames that replace base: the previous one comes back
                log.info("restored %s from %s (a run was killed while replacing it)", base, p.name)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            done.append(p)
        except OSError as e:
            log.warning("could not remove %s: %s", p, e.strerror or e)
    return done
