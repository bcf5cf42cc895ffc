"""Atomic outputs: write beside the target, then rename, so a crash never leaves half an output
that DVC would cache or a later stage would read.

- What is written is fsynced, file and folder, before the rename that publishes it, and the folder
  holding the target after it: a power cut never publishes a name whose data never reached the disk.
- A temporary copy is named `.<target name>.tmp-<host>-<pid>-<random>`: a writer killed before its
  rename (SIGKILL runs no cleanup) leaves one, and the next writer of the same target removes those
  whose process is gone. A live writer's copy is never touched.
- A folder is replaced by exchanging the two in one rename where the OS can (renameat2), so a
  reader never finds the target missing.
- `locked` serializes a read-modify-write of one file over processes (flock).

Linux and other POSIX systems (fcntl)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Iterator

HOST = socket.gethostname()


# --- durability ----------------------------------------------------------------------------------


def fsync_file(path: Path | str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path | str) -> None:
    """Make the folder's entries (names created, renamed, removed) durable; a file system that cannot
    fsync a folder is let be."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder`, the deepest first (a folder's entries after its files)."""
    for parent, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(parent)


# --- temporary copies ----------------------------------------------------------------------------


def temp_beside(target: Path) -> Path:
    """A fresh temporary name beside `target` that says which process writes it (see remove_stale_temps)."""
    return target.with_name(f".{target.name}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_temps(target: Path) -> list[Path]:
    """The temporary copies of `target` whose writer, a process of this host, is gone. A copy from
    another host (a shared file system) is kept: whether its writer lives cannot be told here."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    stale = []
    for entry in os.scandir(target.parent):
        found = pattern.fullmatch(entry.name)
        if found and found["host"] == HOST and not _alive(int(found["pid"])):
            stale.append(Path(entry.path))
    return stale


def remove_stale_temps(target: Path) -> None:
    for path in stale_temps(target):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # another writer may be removing it too
        else:
            path.unlink(missing_ok=True)


# --- folders -------------------------------------------------------------------------------------


@contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = temp_beside(target)
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` at `target` and delete the folder it replaces. Where renameat2
    exchanges the two (Linux), `target` names the old folder or the new one at every moment."""
    try:
        exchanged = _exchange(tmp, target)
    except FileNotFoundError:  # no target yet: a plain rename publishes it
        tmp.rename(target)
        return
    if exchanged:
        shutil.rmtree(tmp, ignore_errors=True)  # tmp's name now holds the old folder
    else:
        _replace_by_two_renames(tmp, target)


def _replace_by_two_renames(tmp: Path, target: Path) -> None:
    # Without an exchange (not Linux, a kernel before 3.15, a file system without it) a rename cannot
    # replace a non-empty folder: the old one is moved aside first, and `target` is missing until
    # the second rename. The aside name is a temporary one, so a kill in between is cleaned up.
    old = temp_beside(target)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


@cache
def _renameat2():
    """glibc's renameat2 (2.28 and later), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two names in one step; False where the OS or file system cannot (the caller falls
    back), FileNotFoundError where either is missing."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


# --- files ---------------------------------------------------------------------------------------


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary file path beside `target` (an empty file, private: 0600); on success it
    is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = temp_beside(target)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(target: Path | str, payload: object) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_parquet(target: Path | str, frame) -> None:
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)


# --- locks ---------------------------------------------------------------------------------------


@contextmanager
def locked(target: Path | str) -> Iterator[None]:
    """Hold an exclusive lock on `target` for a read-modify-write, waiting while another process
    holds it. The lock is the file `.<target name>.lock` beside it (not `target` itself: atomic_path
    replaces that file, and a lock on the replaced one would guard nothing)."""
    target = Path(target)
    lock = target.with_name(f".{target.name}.lock")
    fd = take_lock(lock, wait=True)
    try:
        yield
    finally:
        drop_lock(lock, fd)


def take_lock(path: Path, *, wait: bool) -> int | None:
    """Lock the file `path` (created when missing) with flock and return its descriptor; None when
    another process holds it and not `wait`. The OS releases the lock of a process that ends, a
    killed one too, so a lock is never stale."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _names(fd, path):
            return fd
        # The holder we waited for removed the file on release: lock the one at `path` now.
        os.close(fd)


def drop_lock(path: Path, fd: int) -> None:
    """Remove the lock file, then unlock: a process waiting on it wakes, sees the name gone or
    another file, and locks that (take_lock), so no two hold a lock at once."""
    if _names(fd, path):
        path.unlink(missing_ok=True)
    os.close(fd)


def _names(fd: int, path: Path) -> bool:
    """Whether `path` still names the open file `fd`."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
