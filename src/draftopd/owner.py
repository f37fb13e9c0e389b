"""One owner per output: an exclusive lock per output folder (or file), and the sweep of what a killed owner
left behind.

``owning(path, what)`` holds the lock for as long as a verb writes ``path``: ``data`` its trajectory folder,
``train`` its run folder, ``export`` its OUT, ``demo`` its folder, ``bench`` its ``--json`` and ``--plot``
files. A lock is a file locked with ``flock`` and holding the owner's pid and verb, in one of two places:

* a folder filled in place (``data``, ``train``, ``demo``: ``inside=True``) is locked by ``.draftopd.lock`` inside
  it, the folder's path resolved first (every symbolic link on the way followed), so two spellings of one folder
  (``run`` and a link to it) share one lock, and a writable folder under a read-only parent can be locked. Its
  contents may be replaced (checkpoints, ``final/``) without touching the lock. A missing folder is made for the
  lock (and removed again on release if the run wrote nothing); a dangling link on the way is refused;
* a file, or a folder replaced whole by a rename (``export``'s OUT: its old folder, lock and all, is renamed
  away), by ``.<name>.lock`` beside it, its folder resolved; the rename needs that folder writable anyway. An OUT
  that is an existing folder is then also locked inside, so an export never replaces a folder a run fills; and
  an in-place owner, once it holds its lock, checks the lock beside its folder is free (the export's), so the two
  kinds of owner exclude each other whichever comes first.

A lock file is opened without following links (``O_NOFOLLOW``): one that is a symbolic link, not a regular
file, or a hard link to another file is refused in one line, and nothing is written through it.
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
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from draftopd import DraftopdError

log = logging.getLogger(__name__)

PART = re.compile(r"^\.(?P<base>.+)\.(?P<pid>\d+)(?:-[0-9a-f]+)?\.part$")
FOLDER = re.compile(r"^\.(?P<base>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
LEGACY = re.compile(r"^(?P<base>step_\d{6}|latest|features)\.part$")  # fixed names of earlier releases


LOCK = ".draftopd.lock"  # the lock of a folder filled in place, inside it


def lock_file(path: str | Path, inside: bool = False) -> Path:
    """The lock of an output: ``inside``, ``.draftopd.lock`` in the folder (its path resolved, the last part
    too); else ``.<name>.lock`` beside it (its folder resolved). Either way two spellings share it."""
    p = Path(os.path.abspath(path))
    if inside:
        return Path(os.path.realpath(p)) / LOCK
    return Path(os.path.realpath(p.parent)) / f".{p.name}.lock"


def contents(folder: Path) -> list[Path]:
    """What ``folder`` holds besides an in-place owner's lock (a folder holding only that is empty)."""
    return [p for p in folder.iterdir() if p.name != LOCK]


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
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                text = os.read(fd, 256).decode("utf-8", errors="replace").strip()
            finally:
                os.close(fd)
        except OSError:
            text = ""
        if text:
            pid, _, what = text.partition(" ")
            return f"pid {pid}" + (f", `draftopd {what}`" if what else "")
        time.sleep(0.05)
    return "pid unknown"


def _busy(path: str | Path, lock: Path) -> DraftopdError:
    return DraftopdError(
        f"{path} is in use by another draftopd process ({_holder(lock)}): wait for it to end, or choose another output"
    )


def _link_target(p: Path) -> str:
    try:
        return os.readlink(p)
    except OSError:
        return "?"


class OutputLock:
    """A held lock; ``release()`` (or leaving the ``with`` block) removes the lock file and unlocks it."""

    def __init__(self, path: Path, fd: int, made: list[Path] | None = None) -> None:
        self.path, self.fd, self.made = path, fd, made or []  # made: the folders acquire() created, deepest first

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.lstat(self.path).st_ino == os.fstat(fd).st_ino:
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


def _check_no_dangling_link(path: str | Path) -> None:
    """A folder to lock inside must not be reached through a dangling symbolic link (the lock would make the
    folder it points to, somewhere else)."""
    p = Path(os.path.abspath(path))
    for q in (p, *p.parents):
        if q.is_symlink() and not q.exists():
            where = str(path) if q == p else f"{path}: {q}"
            raise DraftopdError(
                f"{where} is a symbolic link to {_link_target(q)}, which does not exist: nothing was created; "
                "give an existing folder, or a path without the link"
            )


def _open_lock(lock: Path, path: str | Path) -> int | None:
    """``lock`` opened (made if missing) without following a link: its fd, None when its folder just vanished, or
    a one-line refusal when it is a symbolic link, not a regular file, or a hard link to another file."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # its folder was removed (a previous owner's release, or by hand): make it again
        return None
    except OSError as e:
        if e.errno == errno.ELOOP or lock.is_symlink():
            raise DraftopdError(
                f"cannot lock {path}: its lock file {lock} is a symbolic link (to {_link_target(lock)}); nothing "
                "was written through it: remove the link"
            ) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "has other hard links (another file's content)" if stat.S_ISREG(st.st_mode) else "is not a file"
        raise DraftopdError(f"cannot lock {path}: its lock file {lock} {what}; nothing was written to it: remove it")
    return fd


def acquire(path: str | Path, what: str, inside: bool = False, peek: bool = True) -> OutputLock:
    """Lock output ``path`` for this process, or a one-line ``DraftopdError`` naming the holder's pid.
    ``inside``: ``path`` is a folder filled in place (the module docstring); then, with ``peek``, the lock
    beside it must be free too."""
    if inside:
        _check_no_dangling_link(path)
    lock = lock_file(path, inside)
    made: list[Path] = []  # the folders made for the lock, deepest first (again after one vanished: see below)
    try:
        for _ in range(100):
            if not lock.parent.is_dir():
                missing = [d for d in [lock.parent, *lock.parent.parents] if not d.exists() and d not in made]
                made = sorted([*made, *missing], key=lambda d: len(d.parts), reverse=True)
                lock.parent.mkdir(parents=True, exist_ok=True)
            fd = _open_lock(lock, path)
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _busy(path, lock) from None
                raise
            try:
                same = os.lstat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its owner removed it as we locked it: take the new one
                os.close(fd)
                continue
            held = OutputLock(lock, fd, made)
            if inside and peek:
                try:
                    _check_free(lock_file(lock.parent), path)
                except BaseException:
                    held.release()
                    raise
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {what}\n".encode())
            return held
    except OSError as e:
        raise DraftopdError(f"cannot lock {path} ({lock}): {e.strerror or e}") from None
    raise DraftopdError(f"cannot lock {path}: its lock file {lock} keeps changing")


def _check_free(lock: Path, path: str | Path) -> None:
    """One line naming the holder when ``lock`` (a lock beside a folder: an export's, or an older draftopd's) is
    held; nothing is made or written (it may lie in a read-only folder)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # none there (or not ours: a link, a folder): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(path, lock) from None
    finally:
        os.close(fd)  # and with it the shared lock


@contextlib.contextmanager
def owning(path: str | Path, what: str, sweep_inside: bool = True, inside: bool = False) -> Iterator[OutputLock]:
    """Hold the lock of output ``path`` for the block (``inside``: a folder filled in place, locked inside; else
    locked beside it, and inside too when it is an existing folder); first sweep what killed runs left (beside
    ``path`` under its name, and inside it when it is a folder and ``sweep_inside``)."""
    with contextlib.ExitStack() as locks:
        held = locks.enter_context(acquire(path, what, inside))
        p = Path(path)
        if not inside and p.is_dir() and not p.is_symlink():  # replaced whole: no in-place owner may be in it
            locks.enter_context(acquire(path, what, inside=True, peek=False))
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
