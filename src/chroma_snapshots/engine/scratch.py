"""Scratch folders under the temp directory that a killed process cannot strand.

A Lambda timeout or an out-of-memory kill runs no clean-up, and /tmp outlives the process:
a compaction's copy of the database left there by each kill filled /tmp until every later
batch in the container failed. A scratch folder is locked (``flock``) by its owner from
just after it is made until it is removed; a marker inside says the lock was taken, and
names the folder it was made in (a copy of the folder is not a dead owner's). The
next process making a folder of the same kind removes those it can lock that have the
marker: their owner is dead (the kernel drops a dead process's locks). The marker is the
only licence to remove a folder's contents, and a removal takes it last, once all else
went: one a kill cut short, or that left something (a mount inside, descriptors run out),
still has it, and the next sweep goes on with it. A folder without the marker is
only ever removed empty: left between its mkdir and its lock (once old), or the end of a
removal (named ``.going``: at once). A folder its owner handed to its user
(:func:`keep_scratch`) has no marker and stays. A sweep spends at most SWEEP_SECONDS
(it delays its caller's work); a folder it could not remove by then (many files, or some no
one may remove) is marked so, and left alone for LEFTOVER_AGE before the next try.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.folders import folder_id, remove_tree
from chroma_snapshots.engine.placer import local_io
from chroma_snapshots.engine.treewalk import DIR_FLAGS
from chroma_snapshots.engine.workdir import LEFTOVER_AGE
from chroma_snapshots.errors import StorageTimeoutError

_HELD = ".chroma-snapshots-held"  # made once the owner holds the folder's lock
_GOING = ".going"  # the name's end once its removal has begun
_STUCK = b" stuck"  # added to the marker by a sweep that could not remove the folder
SWEEP_SECONDS = 0.5  # the most a sweep spends removing: it delays the caller's own work
# the folders make_scratch made that this process holds: their locks, (device, inode)
_held: dict[Path, tuple[int, tuple[int, int]]] = {}


def _forget_in_child() -> None:
    """A forked child neither removes nor keeps its parent's folders (it shares their
    locks): leaving a ``with`` block or exiting must not take the parent's checkout."""
    for fd, _ in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def temp_dir(what: str) -> Path:
    """The temp directory; LocalDiskError naming ``what`` when there is none to use (a
    read-only file system everywhere tempfile looks)."""
    with local_io("the temporary directory", what):
        return Path(tempfile.gettempdir())


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
    top = temp_dir(what)
    sweep_scratch(prefix, top)
    with local_io(top, what):
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=top))
        fd = os.open(path, DIR_FLAGS)
    try:
        st = os.fstat(fd)
        folder = (st.st_dev, st.st_ino)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a sweeper that looked at it just now
        try:
            with local_io(path, what):  # a full disk: the folder goes too
                _mark(fd, _stamp(st))
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


def sweep_scratch(prefix: str, top: Path | None = None) -> int:
    """Remove this user's scratch folders of ``prefix`` whose owner is dead (in ``top``,
    default the temp directory), for at most SWEEP_SECONDS; how many."""
    removed, dl = 0, Deadline(SWEEP_SECONDS)
    for path in (top or temp_dir("looking for scratch folders")).glob(f"{prefix}*"):
        if dl.expired():
            break  # the rest for the next sweep
        removed += _remove_if_dead(path, dl)
    return removed


def _stamp(st: os.stat_result) -> bytes:
    """What the marker says: the folder it was made in (a copy of the folder, the marker
    with it, is another folder, never taken for a dead owner's)."""
    return f"{st.st_dev}:{st.st_ino}".encode()


def _mark(fd: int, text: bytes) -> None:
    """Write the marker ``text`` into the folder ``fd`` (appending: ``_STUCK`` follows)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    mark = os.open(_HELD, flags, 0o600, dir_fd=fd)
    try:
        if os.write(mark, text) != len(text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), _HELD)
    finally:
        os.close(mark)


def _marker(fd: int, st: os.stat_result) -> tuple[bool, bool]:
    """Whether the folder ``fd`` has a marker made in it, and whether a sweep could not
    remove it within the last LEFTOVER_AGE (it is left alone until then)."""
    try:
        mark = os.open(_HELD, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return False, False
    try:
        words, age = os.read(mark, 256).split(), time.time() - os.fstat(mark).st_mtime
    finally:
        os.close(mark)
    ours = bool(words) and words[0] == _stamp(st)
    return ours, ours and _STUCK.strip() in words[1:] and age < LEFTOVER_AGE


def _discard(path: Path, folder: tuple[int, int], dl: Deadline | None = None) -> bool:
    """Remove the scratch folder ``path`` (that folder only, its marker last), renamed
    first so that the empty folder a kill may leave is known for the end of a removal;
    whether it went (by ``dl`` if given: the rest is left for later)."""
    going = path if path.name.endswith(_GOING) else path.with_name(path.name + _GOING)
    try:
        os.rename(path, going)
    except OSError:
        going = path  # gone already, or the folder cannot be renamed: removed where it is
    else:
        if folder_id(going) != folder:  # another folder was put at the name meanwhile
            with contextlib.suppress(OSError):
                os.rename(going, path)  # its name back; left alone
            return False
    check = (lambda: None) if dl is None else partial(dl.check, "a sweep of scratch folders")
    with contextlib.suppress(StorageTimeoutError):
        remove_tree(going, check, only=folder, last=_HELD)
    return folder_id(going) != folder


def _remove_if_dead(path: Path, dl: Deadline) -> int:
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError:
        return 0  # gone, a file, a link: not a folder of ours
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            return 0  # another user's (root sweeping)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # in the folder locked, by its descriptor: not whatever the path names now
        held, stuck = _marker(fd, st)
        if stuck:
            return 0  # a sweep a moment ago could not empty it: not every sweep again
        if not held:  # killed before its lock, or at a removal's end; or kept (keep_scratch)
            young = time.time() - st.st_mtime < LEFTOVER_AGE
            if young and not path.name.endswith(_GOING):
                return 0  # just made: its owner is about to lock it
            os.rmdir(path)  # only if empty: a kept folder is its user's
            return 1
        if _discard(path, (st.st_dev, st.st_ino), dl):  # under the lock: no owner returns
            return 1
        with contextlib.suppress(OSError):  # what is left waits a while for the next try
            _mark(fd, _STUCK)
        return 0
    except OSError:
        return 0  # its owner holds it
    finally:
        os.close(fd)
