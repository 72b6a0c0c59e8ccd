"""Folders the library makes and removes, known by their device and inode: a work folder
is checked at its making, a finished one where it landed, and only the folder made is
ever removed. A folder another process swapped in under one of those names is set aside
under a name no clean-up takes, never written into, served or deleted (docs/SECURITY.md).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from chroma_snapshots.engine.beneath import REPLACED, FolderId
from chroma_snapshots.engine.treewalk import (
    DIR_FLAGS,
    mount_of,
    mounts_within,
    parent_mount,
    remove_dir,
)
from chroma_snapshots.errors import LocalDiskError

log = logging.getLogger(__name__)
ASIDE = ".replaced-"  # in the names of folders set aside: no clean-up takes them


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


def remove_mine(path: Path, built: FolderId) -> None:
    """Remove the folder ``path`` if it is ``built`` (device, inode); a folder swapped in
    under its name is set aside (:func:`set_aside`), neither removed nor left under a
    name a clean-up would take for a leftover of ours."""
    if folder_id(path) == built:
        remove_tree(path, only=built)
    if os.path.lexists(path) and folder_id(path) != built:
        set_aside(path)


def remove_tree(
    path: Path, check: Callable[[], None] = lambda: None, only: FolderId | None = None
) -> None:
    """Remove a directory tree if it exists (temp folders, failed checkouts), at any depth
    (engine/treewalk.py); a link at ``path`` is removed, never followed. Folders a consumer
    made read-only (or unlistable) get their owner's permissions back first: otherwise the
    tree would stay for good. ``check()`` runs every few entries and may raise. ``only``:
    remove it only if it is that folder (device, inode): one swapped in is not ours."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            if only is None:
                os.unlink(path)
            return
    except OSError:
        return
    remove_dir(path, check, only=only)


def made_here(fd: int, path: Path) -> FolderId:
    """The (device, inode) of the folder just made at ``path`` and opened as ``fd``, once
    checked to be that folder: empty, this user's, on its parent's mount. A folder another
    process swapped in between the mkdir and the open is LocalDiskError (ESTALE), and
    neither written into nor removed."""
    st = os.fstat(fd)
    with os.scandir(fd) as entries:  # one entry is enough: a racer's folder may be huge
        empty = next(entries, None) is None
    if st.st_uid != os.geteuid() or not empty or mount_of(fd) != parent_mount(fd):
        where = set_aside(path)
        raise LocalDiskError(errno.ESTALE, f"{REPLACED}, and {where}", str(path))
    return st.st_dev, st.st_ino


def new_folder(path: Path) -> FolderId:
    """Make the folder ``path`` and return its (device, inode) (:func:`made_here`)."""
    path.mkdir()
    fd = os.open(path, DIR_FLAGS)
    try:
        return made_here(fd, path)
    finally:
        os.close(fd)
