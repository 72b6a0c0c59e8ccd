"""A checkout's work folder: made beside its destination, named for itself, locked while
it is built, removed if the build fails, and swept once a kill left it behind."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from chroma_snapshots.engine.folders import (
    STAGED,
    Made,
    named_for_itself,
    remove_tree,
    sweepable,
)
from chroma_snapshots.engine.treewalk import DIR_FLAGS

# A work folder this old that no process holds was left by a killed checkout (a live one
# holds its lock from the moment it exists but for an instant: the age covers that).
LEFTOVER_AGE = 60.0
_WORK_MARK = "chroma-snapshots-work-"
_NAME_ROOM = 255 - len(_WORK_MARK) - 2 - 8 - 43 - 4  # ".i<inode>-<birth>": up to 43 bytes
_MKDTEMP = "[a-z0-9_]{8}"  # what tempfile.mkdtemp puts between prefix and suffix


def _short_name(name: str) -> str:
    """``name`` as it appears in its work folder's name, within NAME_MAX (255 bytes) however
    long it is (mkdtemp adds 8 characters, the inode and birth up to 43, the suffix 4): a long one
    is cut and tagged with a hash of the whole, so two dests sharing a long beginning never
    share leftovers."""
    raw = os.fsencode(name)
    if len(raw) <= _NAME_ROOM:
        return name
    tag = hashlib.sha256(raw).hexdigest()[:12]
    return f"{raw[: _NAME_ROOM - 13].decode(errors='ignore')}~{tag}"


def work_names(name: str) -> tuple[str, str, re.Pattern[str]]:
    """The prefix of the work folders of checkouts to a dest called ``name``, the stem of
    their names as a pattern (mkdtemp's 8 characters after the prefix), and the pattern
    that matches exactly those names: ``.new`` while made, ``.i<inode>-<birth>.tmp`` once
    named for itself, or an earlier release's ``.tmp``."""
    prefix = f".{_short_name(name)}.{_WORK_MARK}"
    stem = re.escape(prefix) + _MKDTEMP
    return prefix, stem, re.compile(stem + r"(?:\.new|(?:\.i\d+-\d+)?\.tmp)")


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


def _now(job: Callable[[], None]) -> None:
    job()


@contextlib.contextmanager
def work_dir(
    final: Path, dispose: Callable[[Callable[[], None]], None] = _now
) -> Iterator[tuple[Path, tuple[int, int]]]:
    """A new private work folder beside ``final``, named for its inode
    (``.<name>.chroma-snapshots-work-<random>.i<inode>.tmp``), and its (device, inode) for
    :func:`landed`, in which to build what is then renamed to ``final``; locked (``flock``)
    while the block runs and until it is removed if the block fails (by ``dispose``, given
    the removal: it may run it on another thread). First, the work folders of builds of
    the same ``final`` that a kill left behind (no handler ran) are removed: unlocked, and
    not new."""
    prefix, stem, mine = work_names(final.name)
    for old in final.parent.glob(f"{glob.escape(prefix)}*"):
        if mine.fullmatch(old.name):  # not ".a.<mark>q.<mark>xxxxxxxx.tmp", dest a.<mark>q's
            remove_if_left(old, stem)
    try:
        try:
            staged = Path(tempfile.mkdtemp(prefix=prefix, suffix=STAGED, dir=final.parent))
        except FileNotFoundError:  # a failed checkout to a sibling removed the parent it
            final.parent.mkdir(parents=True, exist_ok=True)  # made for both: once more
            staged = Path(tempfile.mkdtemp(prefix=prefix, suffix=STAGED, dir=final.parent))
    except PermissionError as e:
        e.strerror = (  # what the user sees: why the parent matters
            f"{e.strerror}: a checkout is built in a work folder beside its destination, "
            "so the destination's parent folder must be writable"
        )
        e.filename = str(final.parent)
        raise
    try:  # never through a link swapped in for it (its mode is set through the descriptor)
        fd = os.open(staged, DIR_FLAGS)
    except OSError:  # out of descriptors, say: an empty folder goes, whoever's it is
        with contextlib.suppress(OSError):
            os.rmdir(staged)
        raise
    built = None
    try:
        unnamed = staged.with_name(staged.name.removesuffix(STAGED))
        work, built = named_for_itself(fd, staged, unnamed, ".tmp")  # a sweep takes only it
        os.fchmod(fd, 0o777 & ~_umask())  # mkdtemp makes it private; a checkout is not
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield work, built
    except BaseException:
        held, fd = fd, -1  # the removal closes it: locked against sweeps until it is gone
        # (or tried again without the lock: engine/folders.Made.remove)
        dispose(Made(work, held, built).remove if built else partial(os.close, held))
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def remove_if_left(path: Path, stem: str) -> None:
    """Remove an old work folder of this user's that no checkout holds (locked), if it is
    the folder its name says (engine/folders.sweepable, ``stem``: the names' beginning)."""
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError:
        return  # gone, or not a folder we made
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or time.time() - st.st_mtime < LEFTOVER_AGE:
            return  # another user's (root sweeping), or new
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # a checkout in progress holds it
    finally:
        os.close(fd)
    if sweepable(path, stem, ".tmp") == (st.st_dev, st.st_ino):  # and still what was checked
        remove_tree(path, only=(st.st_dev, st.st_ino))
