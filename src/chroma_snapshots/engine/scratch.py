"""Scratch folders under the temp directory that a killed process cannot strand.

A Lambda timeout or an out-of-memory kill runs no clean-up, and /tmp outlives the process:
a compaction's copy of the database left there by each kill filled /tmp until every later
batch in the container failed. A scratch folder is locked (``flock``) by its owner from
just after it is made until it is removed; a marker inside says the lock was taken. The
next process making a folder of the same kind removes those it can lock that have the
marker: their owner is dead (the kernel drops a dead process's locks). A folder without
the marker was left between its mkdir and its lock, and is empty: removed once old; or its
owner handed it to its user (:func:`keep_scratch`), and it stays. A
removal renames the folder first (``.going``): one a kill cut short, its marker perhaps
gone already, is finished by the next sweep at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from chroma_snapshots.engine.folders import remove_tree
from chroma_snapshots.engine.placer import local_io
from chroma_snapshots.engine.treewalk import DIR_FLAGS
from chroma_snapshots.engine.workdir import LEFTOVER_AGE

_HELD = ".chroma-snapshots-held"  # made once the owner holds the folder's lock
_GOING = ".going"  # the name's end once its removal has begun
# the folders make_scratch made that this process holds: their locks, (device, inode)
_held: dict[Path, tuple[int, tuple[int, int]]] = {}


@contextlib.contextmanager
def scratch_dir(prefix: str, what: str) -> Iterator[Path]:
    """A new private folder ``<temp dir>/<prefix><random>``, removed when the block ends
    (however it ends) and, should the process be killed, by the next call with the same
    ``prefix`` on this machine. A disk that refuses it is LocalDiskError / CacheFullError
    naming ``what``."""
    path = make_scratch(prefix, what)
    try:
        yield path
    finally:
        discard_scratch(path)


def make_scratch(prefix: str, what: str) -> Path:
    """:func:`scratch_dir` for a folder that outlives a block: held by this process until
    :func:`discard_scratch` (or :func:`keep_scratch`), or until the process ends."""
    sweep_scratch(prefix)
    with local_io(tempfile.gettempdir(), what):
        path = Path(tempfile.mkdtemp(prefix=prefix))
        fd = os.open(path, DIR_FLAGS)
    try:
        st = os.fstat(fd)
        folder = (st.st_dev, st.st_ino)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a sweeper that looked at it just now
        try:
            with local_io(path, what):  # a full disk: the folder goes too
                os.close(os.open(path / _HELD, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except BaseException:
            _discard(path, folder)  # before the lock goes
            raise
    except BaseException:
        os.close(fd)
        raise
    _held[path] = (fd, folder)
    return path


def discard_scratch(path: Path) -> None:
    """Remove the scratch folder ``path`` that :func:`make_scratch` made, and let it go; a
    second call (or one for a folder this process does not hold) does nothing."""
    held = _held.pop(path, None)
    if held is not None:
        try:
            _discard(path, held[1])  # before the lock goes
        finally:
            os.close(held[0])


def keep_scratch(path: Path) -> None:
    """Hand the scratch folder ``path`` over to whoever was told its name (the CLI prints
    a checkout's): its marker goes, so no sweep removes it, and this process lets it go."""
    held = _held.pop(path, None)
    if held is not None:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_HELD, dir_fd=held[0])
        finally:
            os.close(held[0])


def sweep_scratch(prefix: str) -> int:
    """Remove this user's scratch folders of ``prefix`` whose owner is dead; how many."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        removed += _remove_if_dead(path)
    return removed


def _discard(path: Path, folder: tuple[int, int]) -> None:
    """Remove the scratch folder ``path`` (that folder only), renamed first to say so: a
    removal cut short (a kill) takes the marker with it, and the name tells the next
    sweep it may finish the job at once instead of taking the rest for a folder just made."""
    going = path if path.name.endswith(_GOING) else path.with_name(path.name + _GOING)
    try:
        os.rename(path, going)
    except OSError:
        going = path  # gone already, or the folder cannot be renamed: removed where it is
    remove_tree(going, only=folder)


def _remove_if_dead(path: Path) -> int:
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError:
        return 0  # gone, a file, a link: not a folder of ours
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            return 0  # another user's (root sweeping)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:  # in the folder locked, by its descriptor: not whatever the path names now
            held = bool(os.stat(_HELD, dir_fd=fd, follow_symlinks=False))
        except FileNotFoundError:
            held = path.name.endswith(_GOING)  # a removal was begun: its owner is gone
        if not held:  # made, its owner killed before its lock; or kept (keep_scratch)
            if time.time() - st.st_mtime < LEFTOVER_AGE:
                return 0  # just made: its owner is about to lock it
            os.rmdir(path)  # only if empty: a kept folder is its user's
            return 1
        _discard(path, (st.st_dev, st.st_ino))  # under the lock: no owner returns
        return 1
    except OSError:
        return 0  # its owner holds it
    finally:
        os.close(fd)
