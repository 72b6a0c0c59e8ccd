"""Folders the library makes and removes, known by their device and inode: a work folder
is checked at its making, a finished one where it landed, and only the folder made is
ever removed. A folder another process swapped in under one of those names is set aside
under a name no clean-up takes, never written into, served or deleted (docs/SECURITY.md).

Each folder is held open while it is used (:class:`Made`: a file system gives a freed
inode number to the next folder made, so only a held one's number is its own) and named
for itself once made (``<name>.i<inode>-<birth ns>``), so a clean-up in another process,
after a kill, takes a folder at such a name only if it is still the one made
(:func:`sweepable`): one another process put there is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from chroma_snapshots.engine.beneath import REPLACED, FolderId
from chroma_snapshots.engine.treewalk import (
    DIR_FLAGS,
    born,
    is_mount_root,
    mounts_within,
    ran_short,
    remove_dir,
    rename_new,
)
from chroma_snapshots.errors import LocalDiskError

log = logging.getLogger(__name__)
ASIDE = ".replaced-"  # in the names of folders set aside: no clean-up takes them
STAGED = ".new"  # a folder being made, not yet named for itself: removed only if empty
# holds a folder (its inode number stays its own) without needing permission to read it
HOLD_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A failed build's folder that cannot be removed for want of descriptors (a process at
# RLIMIT_NOFILE: removing needs folders open) is tried again after these pauses, 3.15 s
# in all: its own last workers free theirs as they end. A clean-up thread runs it, in the
# background once the caller stops waiting (engine/cleanup.py).
SHORT_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def folder_of(fd: int) -> FolderId:
    """(device, inode) of the folder open as ``fd``."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def folder_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the real folder at ``path``; None if it is not one."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def landed(final: Path, work: Path, built: FolderId | None, forget: Callable[[], None]) -> None:
    """After the work folder ``work`` was renamed to ``final``: LocalDiskError unless
    ``final`` is the folder that was built (``built``: its :func:`folder_id`) with no file
    system mounted inside it. A process that swaps a folder of its own in under the work
    folder's name between the last write and the rename gets it moved aside beside
    ``final`` (``.<name>.replaced-<random>``, never deleted: it is not ours); the folder
    built, with a mount inside, goes back to ``work`` (the caller removes it as a failed
    build; the mount and what is on it stay). Either way ``forget()`` then drops what
    recorded it, and it is never served (a rename goes by path)."""
    if built is not None and folder_id(final) == built:
        if not mounts_within(final):
            return
        os.rename(final, work)  # ours: removed with the failed build, all but the mount
        forget()
        raise LocalDiskError(errno.EBUSY, "a file system was mounted inside the work folder "
                             "before it landed; nothing was delivered", str(final))  # fmt: skip
    where = set_aside(final)
    forget()
    raise LocalDiskError(errno.ESTALE, f"{REPLACED}, and {where}", str(final))


def set_aside(path: Path) -> str:
    """Move what is at ``path`` (a folder another process swapped in for one of ours) to
    ``.<name>.replaced-<random>`` beside it, a name no clean-up removes: it is not ours
    to delete. Returns where it went, said for an error message."""
    aside = path.with_name(f".{path.name}{ASIDE}{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return "it is gone"
    except OSError as e:
        return f"it stays at {path}: it could not be moved aside ({e.strerror})"
    log.warning("a folder swapped in for %s was moved to %s, not deleted", path, aside)
    return f"it was moved to {aside}"


def remove_mine(path: Path, built: FolderId, waits: tuple[float, ...] = SHORT_WAITS) -> None:
    """Remove the folder ``path`` if it is ``built`` (device, inode); a folder swapped in
    under its name is set aside (:func:`set_aside`), neither removed nor left under a
    name a clean-up would take for a leftover of ours. Out of descriptors, it tries again
    after each of ``waits``."""
    ran_short()  # what an earlier removal on this thread ran into is not this one's
    for pause in (*waits, None):
        if folder_id(path) == built:
            remove_tree(path, only=built)
        # out of descriptors at any moment of it: worth another try, even if some came
        # free since (another thread's work ending is what frees them)
        if not ran_short() or pause is None or folder_id(path) != built:
            break
        time.sleep(pause)
    if os.path.lexists(path) and folder_id(path) != built:
        set_aside(path)


def remove_tree(
    path: Path,
    check: Callable[[], None] = lambda: None,
    only: FolderId | None = None,
    last: str | None = None,
) -> None:
    """Remove a directory tree if it exists (temp folders, failed checkouts), at any depth
    (engine/treewalk.py); a link at ``path`` is removed, never followed. Folders a consumer
    made read-only (or unlistable) get their owner's permissions back first: otherwise the
    tree would stay for good. ``check()`` runs every few entries and may raise. ``only``:
    remove it only if it is that folder (device, inode): one swapped in is not ours.
    ``last``: a file in it removed after everything else (:func:`remove_dir`)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            if only is None:
                os.unlink(path)
            return
    except OSError:
        return
    remove_dir(path, check, only=only, last=last)


def made_here(fd: int, path: Path) -> FolderId:
    """The (device, inode) of the folder just made at ``path`` and opened as ``fd``, once
    checked to be that folder: empty, this user's, on its parent's mount. A folder another
    process swapped in between the mkdir and the open is LocalDiskError (ESTALE), and
    neither written into nor removed."""
    st = os.fstat(fd)
    with os.scandir(fd) as entries:  # one entry is enough: a racer's folder may be huge
        empty = next(entries, None) is None
    if st.st_uid != os.geteuid() or not empty or is_mount_root(fd):
        where = set_aside(path)
        raise LocalDiskError(errno.ESTALE, f"{REPLACED}, and {where}", str(path))
    return st.st_dev, st.st_ino


class Made:
    """A folder this process made or took: where it is, its (device, inode), and a
    descriptor held on it until :meth:`close`. While it is held the inode number cannot be
    handed to another folder (a file system gives a freed one out again at once), so a
    check that a path still leads to this folder is sound."""

    def __init__(self, path: Path, fd: int, known: FolderId | None = None) -> None:
        """``known``: the folder's (device, inode) if already read (not asked again)."""
        self.path, self.fd = path, fd
        self.id = folder_of(fd) if known is None else known

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Remove the folder if it is still this one (:func:`remove_mine`), then close.
        Still there (out of descriptors, say), it is tried again once closed: the held
        descriptor may be the one missing, and while the folder exists no other can
        have its inode number."""
        try:
            remove_mine(self.path, self.id, waits=())
        finally:
            self.close()
        remove_mine(self.path, self.id)


def new_folder(path: Path, suffix: str = "") -> Made:
    """Make a folder named for itself (:func:`carrying`; made as ``<path>.new``, checked
    by :func:`made_here`, then renamed) and hold it (:class:`Made`; the caller closes)."""
    staged = path.with_name(path.name + STAGED)
    staged.mkdir()
    fd = os.open(staged, DIR_FLAGS)
    try:
        return Made(named_for_itself(fd, staged, path, suffix)[0], fd)
    except BaseException:
        os.close(fd)
        raise


def carrying(path: Path, fd: int, suffix: str = "") -> Path:
    """``path`` named for the folder open as ``fd``: ``<name>.i<inode>-<birth ns><suffix>``.
    The inode number alone would not do: one freed is given to the next folder made."""
    return path.with_name(f"{path.name}.i{os.fstat(fd).st_ino}-{born(fd=fd)}{suffix}")


def named_for_itself(fd: int, staged: Path, path: Path, suffix: str = "") -> tuple[Path, FolderId]:
    """Check the folder just made at ``staged`` (open as ``fd``, which the caller holds:
    :func:`made_here`) and move it to :func:`carrying` its name, onto nothing;
    LocalDiskError (ESTALE) if what moved is not it (swapped meanwhile: set aside). Returns
    where it is and its identity."""
    try:
        built = made_here(fd, staged)
        final = carrying(path, fd, suffix)
    except OSError:  # out of descriptors, say: an empty folder goes, whoever's it is
        with contextlib.suppress(OSError):
            os.rmdir(staged)
        raise
    try:
        rename_new(staged, final)
    except OSError:
        remove_mine(staged, built)
        raise
    if folder_id(final) != built:
        where = set_aside(final)
        raise LocalDiskError(errno.ESTALE, f"{REPLACED}, and {where}", str(final))
    return final, built


def sweepable(path: Path, stem: str, suffix: str = "") -> FolderId | None:
    """What a clean-up of leftovers may remove at ``path`` (the identity to remove it by,
    ``remove_tree(only=)``), or None: leave it. Only names the library gives, ``stem`` (a
    regular expression) then: ``.new`` (a folder being made: removed here if empty, as a
    folder is named for itself before anything is put in it), ``.i<inode>-<birth><suffix>``
    (only if it is still that folder: both must match; a file system without birth times
    writes 0 and is matched by inode alone), or ``<suffix>`` alone (an earlier release's
    name: whatever folder is there)."""
    name = path.name
    if re.fullmatch(stem + re.escape(STAGED), name):
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    found = folder_id(path)
    if found is None:
        return None
    named = re.fullmatch(stem + r"\.i(\d+)-(\d+)" + re.escape(suffix), name)
    if named is not None:
        birth = int(named[2])
        same = int(named[1]) == found[1] and (birth == 0 or birth == born(path))
        return found if same else None
    return found if re.fullmatch(stem + re.escape(suffix), name) else None
