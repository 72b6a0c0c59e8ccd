"""The cache's own folders (a name's ``versions/``, ``meta/``, ``pins/<version>/`` and the
like), made, opened and listed without following a link at any level below the store's
cache folder (which layout.check_trusted vouches for).

Only the cache writes these folders, but a link or a file found at one of their names (hand
damage, a consumer's script) must never lead a listing's clean-up to remove files elsewhere
or a write to land elsewhere: such an entry is removed (the link itself, never what it
names) and the folder made anew, or read as empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from chroma_snapshots.engine.folders import remove_tree

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)  # O_NOFOLLOW | O_DIRECTORY on a link or a file


def own_folder(path: Path, below: Path) -> Path:
    """``path`` as a real folder, each part of it below ``below`` made if missing; a link,
    file or other entry at a part's name is removed first (never followed)."""
    at = below
    for part in path.relative_to(below).parts:
        at = at / part
        try:
            if stat.S_ISDIR(os.lstat(at).st_mode):
                continue
            os.unlink(at)  # a link (itself) or a file where a folder of ours belongs
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileExistsError):  # made meanwhile: checked by the next
            os.mkdir(at, 0o700)
        if not stat.S_ISDIR(os.lstat(at).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder of the cache's", str(at))
    return path


def open_folder(path: Path, below: Path) -> int | None:
    """``path`` opened (a descriptor the caller closes) with no link followed at any part
    of it below ``below``; None if a part is missing, or is not a real folder (a link or a
    file there is removed, never followed)."""
    fd = os.open(below, _DIR & ~os.O_NOFOLLOW)
    try:
        for part in path.relative_to(below).parts:
            try:
                inner = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno not in _NOT_A_DIR:
                    raise
                with contextlib.suppress(OSError):
                    os.unlink(part, dir_fd=fd)  # the link or file itself
                return None
            os.close(fd)
            fd = inner
        opened, fd = fd, -1
        return opened
    finally:
        if fd >= 0:
            os.close(fd)


def listed(path: Path, below: Path) -> list[str]:
    """The names in the folder ``path`` (see :func:`open_folder`; [] if it is not one)."""
    fd = open_folder(path, below)
    if fd is None:
        return []
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def own_lock_file(path: Path) -> Path:
    """``path`` for a lock file: anything but a regular file at its name (a link, a folder:
    hand damage) is removed first, never followed; one of ours made unwritable gets its
    owner's rights back (not through a hard link: that file is someone else's too)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(st.st_mode):
        remove_tree(path)  # (a link: the link itself)
    elif st.st_mode & 0o600 != 0o600 and st.st_nlink == 1:
        os.chmod(path, 0o600)
    return path
