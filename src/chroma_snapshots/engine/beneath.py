"""Files of a folder tree reached through folder descriptors: no link followed, no mount
crossed, whenever either appears.

A path such as ``tree/a/f`` is resolved again by the kernel at each use: a process that
swaps ``tree/a`` for a link between two uses redirects the second one, and a repair that
writes ``tree/a/f`` would write through the link (a review did it in 13 of 30 rounds).
Here every folder is opened relative to the one above it with O_NOFOLLOW and checked to be
on the root's file system, and a file is opened relative to its folder with O_NOFOLLOW,
checked to be a regular file and, to be written, to have no other link: a link anywhere
on the way is an error or is replaced, never followed. A folder swapped out after it was
opened is still the same folder (a descriptor names the folder, not its path): whatever is
written goes where the cache put it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from types import TracebackType

from chroma_snapshots.engine.treewalk import (
    DIR_FLAGS,
    born,
    mount_of,
    open_owned,
    own_at,
    parent_mount,
    remove_dir,
)
from chroma_snapshots.errors import LocalDiskError

# a file to read: a FIFO never blocks the open, a link at the file itself is not followed
READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
_KEPT = 16  # folder descriptors kept open, least recently used closed first (RLIMIT_NOFILE)
_MOUNTED = (
    "a file system is mounted inside the version's folder or at it; nothing is "
    "written into it or deleted from it (unmount it, then check out again)"
)
REPLACED = "the work folder was replaced while it was being built; nothing was delivered"
FolderId = tuple[int, int]  # (device, inode) of a folder (or a file)
# (device, inode, birth ns) of a file made: the inode number alone is given out again once
# the file is gone (ext4 does at once), the birth time is not; 0 where none is kept
FileId = tuple[int, int, int]


def file_id(fd: int) -> FileId:
    """The :data:`FileId` of the file open as ``fd``."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, born(fd=fd)


_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)  # O_NOFOLLOW | O_DIRECTORY on a link or a file


def open_regular(path: str | Path) -> int:
    """A descriptor to read the regular file at ``path``; anything else is an OSError at
    once (a FIFO a consumer left would block a read forever, past any deadline)."""
    fd = os.open(path, READ_FLAGS)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    return fd


class Beneath:
    """The files and folders below ``root``, reached without following links and without
    leaving ``root``'s file system. Thread-safe; close it (or use it as a context manager)
    when done: it holds folder descriptors."""

    def __init__(self, root: Path | str, expect: FolderId | None = None) -> None:
        """``expect``: the (device, inode) ``root`` must have (a work folder made for
        this tree: one swapped in under its name is an error before anything is written
        into it)."""
        self.path = Path(root)
        # owned: a consumer's chmod 000 on the version's folder must not wedge it
        fd = open_owned(root, None)
        self._root = os.open(root, DIR_FLAGS) if fd is None else fd  # (raises: why not)
        try:  # (looking above it needs a descriptor too: EMFILE must not leak the root's)
            self.mount = mount_of(self._root)
            st = os.fstat(self._root)
            if expect is not None and (st.st_dev, st.st_ino) != expect:
                raise self._error(errno.ESTALE, REPLACED, "")
            # a file system (or a bind mount) at the folder itself is not the cache's either
            if parent_mount(self._root) != self.mount:
                raise self._error(errno.EXDEV, _MOUNTED, "")
        except BaseException:
            os.close(self._root)
            raise
        self._dirs: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __enter__(self) -> Beneath:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every descriptor (idempotent)."""
        with self._lock:
            fds, self._dirs = [*self._dirs.values(), self._root], OrderedDict()
            self._root = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def open(
        self,
        rel: str,
        flags: int,
        mode: int = 0o666,
        *,
        parents: bool = False,
        known: FileId | None = None,
    ) -> int:
        """Open the file ``rel`` (relative, ``/``-separated) with ``flags``; the caller
        closes it. A link at ``rel`` is ELOOP; what is not a regular file, or (to write)
        a file with another link or on another mount, is LocalDiskError. ``parents`` makes
        missing folders on the way, replacing a link or file where a folder belongs.
        ``known``: the :data:`FileId` of a file this tree made before: found again, it
        needs no other check (a file mounted over it, or made in its place, is another);
        without a birth time it gets every check."""
        parent, name = _split(rel)
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR))
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        with self._lock:
            at = self._folder(parent, parents)
            if flags & os.O_CREAT:
                with suppress(FileExistsError):  # a file new from this call is ours
                    return os.open(name, flags | os.O_EXCL, mode, dir_fd=at)
            fd = os.open(name, flags, mode, dir_fd=at)
            try:
                if known is None or known[2] == 0 or file_id(fd) != known:
                    self._own_file(fd, at, name, rel, writing)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _own_file(self, fd: int, at: int, name: str, rel: str, writing: bool) -> None:
        """Refuse ``fd`` unless it is a regular file and, to be changed, one with no other
        link that ``name`` in the folder ``at`` still names: a process that links its own
        file in just before the open and takes it out just after leaves a descriptor on
        its file, with one link, that the name no longer leads to."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise self._error(errno.EPERM, "not a regular file", rel)
        if writing:
            if mount_of(fd) != self.mount:  # a file bind-mounted over the cache's
                raise self._error(errno.EXDEV, _MOUNTED, rel)
            now = os.stat(name, dir_fd=at, follow_symlinks=False)
            if st.st_nlink != 1 or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise self._error(errno.EPERM, "not a file of the cache's own (another link "
                                  "to it, or swapped while it was opened)", rel)  # fmt: skip

    def folder(self, rel: str, make: bool = False) -> None:
        """Check that the folder ``rel`` is a real folder of this file system; ``make``
        creates it and missing parents, replacing a link or file in the way."""
        with self._lock:
            self._folder(rel, make)

    def scan(self, rel: str) -> list[tuple[str, bool]]:
        """The entries of the folder ``rel``: (name, a real folder, not a link to one?)."""
        with self._lock:  # a description of its own: a listing moves its offset
            fd = os.open(".", DIR_FLAGS, dir_fd=self._folder(rel, False))
        try:
            with os.scandir(fd) as entries:
                return [(e.name, _real_dir(e)) for e in entries]
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        """``os.lstat`` of ``rel``; None if it cannot be reached: missing, or behind a
        link, a file or an unlistable folder where a folder should be."""
        parent, name = _split(rel)
        try:
            with self._lock:
                return os.stat(name, dir_fd=self._folder(parent, False), follow_symlinks=False)
        except OSError as e:
            if isinstance(e, LocalDiskError):
                raise  # a mount on the way
            return None

    def identity(self, rel: str) -> tuple[FileId, os.stat_result]:
        """The :data:`FileId` of what is at ``rel`` (a link is not followed), and its stat."""
        parent, name = _split(rel)
        with self._lock:
            at = self._folder(parent, False)
            st = os.stat(name, dir_fd=at, follow_symlinks=False)
            return (st.st_dev, st.st_ino, born(name, at)), st

    def check_made(self, rel: str, known: FileId) -> os.stat_result:
        """Its stat, or LocalDiskError unless ``rel`` is still the file made as ``known``
        (device, inode and birth time; by inode alone where no birth time is kept) with no
        other link: a file of another process's put in its place after it was written, or
        a link to it made elsewhere, is never delivered."""
        now, st = self.identity(rel)
        if not known[2]:
            now = (now[0], now[1], 0)
        if now != known or st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
            raise self._error(errno.ESTALE, "not the file written (replaced, or linked "
                              "elsewhere, after it was written)", rel)  # fmt: skip
        return st

    def chmod(self, rel: str, mode: int) -> None:
        """Set the mode of the regular file ``rel`` with no other link (a link there is an
        error, never followed: Linux has no lchmod, so the file is opened as a path,
        checked, and changed through its descriptor)."""
        parent, name = _split(rel)
        with self._lock:
            at = self._folder(parent, False)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at)
            try:
                self._own_file(fd, at, name, rel, True)
                os.chmod(f"/proc/self/fd/{fd}", mode)
            finally:
                os.close(fd)

    def unlink(self, rel: str) -> None:
        """Remove ``rel`` if it is not a folder (a file, a link to anything); a folder
        there (one put back since it was listed as a link) stays; nothing if missing."""
        parent, name = _split(rel)
        try:
            with self._lock:
                os.unlink(name, dir_fd=self._folder(parent, False))
        except (FileNotFoundError, IsADirectoryError):
            pass

    def remove(self, rel: str, check: Callable[[], None] = lambda: None) -> None:
        """Remove ``rel`` whatever it is (a folder with everything in it, engine/treewalk);
        a link is removed, never followed; nothing if it is missing."""
        parent, name = _split(rel)
        try:
            with self._lock:
                fd = os.dup(self._folder(parent, False))
                self._forget(rel)
        except FileNotFoundError:
            return  # no folder, nothing in it
        try:
            try:
                os.unlink(name, dir_fd=fd)
            except IsADirectoryError:
                remove_dir(name, check, dir_fd=fd)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)

    def _folder(self, rel: str, make: bool) -> int:
        """The descriptor of the folder ``rel``, kept open (the caller holds the lock and
        uses it before letting go). Opened from the deepest folder on the way already
        kept, one level at a time, without recursion (a path may be 2,000 folders deep)."""
        if self._root < 0:
            raise self._error(errno.EBADF, "the tree was closed", rel)
        if not rel:
            return self._root
        if (fd := self._dirs.get(rel)) is not None:
            self._dirs.move_to_end(rel)
            if make:  # kept from a look that did not own it
                _own(fd, os.fstat(fd))
            return fd
        parts = rel.split("/")
        i = len(parts) - 1
        while i and "/".join(parts[:i]) not in self._dirs:
            i -= 1
        fd = self._dirs["/".join(parts[:i])] if i else self._root
        for j in range(i, len(parts)):
            sub = "/".join(parts[: j + 1])
            fd = self._dirs[sub] = self._open_dir(fd, parts[j], make, sub)
            if len(self._dirs) > _KEPT:  # the oldest: never the one just opened
                os.close(self._dirs.popitem(last=False)[1])
        return fd

    def _open_dir(self, parent: int, name: str, make: bool, rel: str) -> int:
        """Open ``name`` in ``parent`` as a folder of this file system; ``make`` creates
        it (replacing a link or a file in the way) and gives its owner back permissions a
        consumer's chmod took away."""
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if not make:
                raise
            if e.errno == errno.EACCES:  # a consumer's chmod 000
                own_at(name, parent)
            else:
                if e.errno in _NOT_A_DIR:  # a link or a file where a folder belongs
                    os.unlink(name, dir_fd=parent)
                elif e.errno != errno.ENOENT:
                    raise
                os.mkdir(name, dir_fd=parent)
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        try:
            st = os.fstat(fd)
            if mount_of(fd) != self.mount:
                raise self._error(errno.EXDEV, _MOUNTED, rel)
            if make:
                _own(fd, st)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _forget(self, rel: str) -> None:
        """Close the kept descriptors of ``rel`` and the folders below it (being removed)."""
        for kept in [k for k in self._dirs if k == rel or k.startswith(f"{rel}/")]:
            os.close(self._dirs.pop(kept))

    def _error(self, code: int, why: str, rel: str) -> LocalDiskError:
        return LocalDiskError(code, why, str(self.path / rel))


def _own(fd: int, st: os.stat_result) -> None:
    if st.st_mode & 0o700 != 0o700:  # a consumer's chmod 0500
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)


def _split(rel: str) -> tuple[str, str]:
    parent, _, name = rel.rpartition("/")
    return parent, name


def _real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False
