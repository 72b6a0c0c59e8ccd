"""The source tree a publish reads: its regular files found by one walk that refuses
what a snapshot cannot hold (special files, links out, bad names), each file opened
beneath the folder it was found in and checked, once read, to be what the walk saw."""

from __future__ import annotations

import errno
import os
import stat
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

from chroma_snapshots.engine.beneath import READ_FLAGS
from chroma_snapshots.engine.stampindex import Stamp, stamp_of
from chroma_snapshots.engine.storeparts import refuse_store_parts
from chroma_snapshots.engine.validation import (
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    MAX_PATH_DEPTH,
    check_relpath,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError


class SourceFile(NamedTuple):
    """A regular file found in a source tree (``path``: its path as a string; a Path
    object per file was a tenth of a 100,000-file publish, and a tuple is made in a third
    of the time of a frozen dataclass)."""

    relpath: str
    path: str
    size: int
    mode: int
    times: tuple[int, int]  # mtime_ns and ctime_ns as the scan saw them (check_unchanged)
    stamp: Stamp | None = None  # what the scan saw; None: racy (see engine.stampindex)

    @property
    def abspath(self) -> Path:
        return Path(self.path)


def scan_source(
    root: str | Path, avoid: Mapping[tuple[int, int], str] | None = None
) -> tuple[list[SourceFile], list[str]]:
    """Regular files (sorted by path) and empty directories below ``root``.

    A folder whose (device, inode) is in ``avoid`` (a store's or a cache's: engine/apart.py)
    is refused with InvalidInputError naming it, however it is reached (a bind mount), and
    so is any folder that is recognisably a store's or a cache's, whatever shows it there
    (engine/storeparts.py).

    Symlinks, devices, sockets, names that could not round-trip safely and trees deeper
    than ``MAX_PATH_DEPTH`` are refused with InvalidInputError: a snapshot must mean the
    same bytes everywhere. The walk keeps its own stack (no recursion), so any depth of
    tree ends in that error, found before anything below the limit is read.
    """
    try:
        is_dir = Path(root).is_dir()
    except OSError as e:  # a name too long, a folder on the way not ours to read
        raise InvalidInputError(f"source {str(root)!r} cannot be read ({e.strerror})") from e
    if not is_dir:
        raise InvalidInputError(f"source {str(root)!r} is not a directory")
    # Its real path: every file's path is then the one the kernel resolves it to, which
    # open_source checks (a folder swapped for a link after the scan leads elsewhere).
    top = Path(os.path.realpath(root))
    files: list[SourceFile] = []
    empty: list[str] = []
    scanned_ns = time.time_ns()  # before any stat: files changed after it are racy
    todo: list[tuple[str, str, int]] = [(str(top), "", 0)]  # (directory, relpath, depth)
    while todo:
        here, rel_dir, depth = todo.pop()
        entries = _list_dir(here)
        if not entries:
            if rel_dir:
                empty.append(rel_dir)
            continue
        refuse_store_parts(here, entries)  # however a store's folders show here
        if depth >= MAX_PATH_DEPTH:
            raise InvalidInputError(
                f"{entries[0].path}: more than {MAX_PATH_DEPTH} levels below the source directory"
            )
        for entry, rel in zip(entries, _checked_names(rel_dir, entries), strict=True):
            st = _lstat(entry)
            kind = st.st_mode
            if stat.S_ISREG(kind):
                times, stamp = (st.st_mtime_ns, st.st_ctime_ns), stamp_of(st, scanned_ns)
                files.append(SourceFile(rel, entry.path, st.st_size, kind & 0o777, times, stamp))
            elif stat.S_ISDIR(kind):
                if avoid and (st.st_dev, st.st_ino) in avoid:
                    raise InvalidInputError(
                        f"{avoid[st.st_dev, st.st_ino]} is inside the folder being published, "
                        f"at {entry.path}: publish a folder that does not hold it"
                    )
                todo.append((entry.path, rel, depth + 1))
            elif stat.S_ISLNK(kind):
                raise InvalidInputError(f"{entry.path}: symlinks are not supported in snapshots")
            else:
                raise InvalidInputError(f"{entry.path}: not a regular file")
    files.sort(key=attrgetter("relpath"))
    return files, sorted(empty)


def _checked_names(rel_dir: str, entries: list[os.DirEntry[str]]) -> list[str]:
    """The relative paths of a directory's entries, each a safe relative path (``rel_dir``
    was checked as it was entered). Plain ASCII needs no Unicode normalization: that fast
    case is checked for the whole directory at once, anything else path by path by
    ``check_relpath``."""
    prefix = f"{rel_dir}/" if rel_dir else ""
    names = [e.name for e in entries]
    text = prefix + "".join(names)
    longest = max(map(len, names))
    plain = text.isascii() and "\\" not in text and "\x00" not in text
    if plain and longest <= MAX_COMPONENT_BYTES and len(prefix) + longest <= MAX_PATH_BYTES:
        return [prefix + n for n in names]
    return [_checked(prefix + n, n) for n in names]


def _checked(rel: str, name: str) -> str:
    """:func:`_checked_names` for one path ``rel``, whose last component is ``name``."""
    plain = rel.isascii() and "\\" not in name and "\x00" not in name
    if plain and len(name) <= MAX_COMPONENT_BYTES and len(rel) <= MAX_PATH_BYTES:
        return rel
    return _relpath(rel)


def _list_dir(here: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(here) as it:
            return list(it)
    except OSError as e:
        raise InvalidInputError(f"{here}: cannot list the source directory ({e})") from e


def _lstat(entry: os.DirEntry[str]) -> os.stat_result:
    try:
        return entry.stat(follow_symlinks=False)
    except OSError as e:
        raise InvalidInputError(f"{entry.path}: cannot stat a source file ({e})") from e


def _relpath(rel: str) -> str:
    try:
        return check_relpath(rel, "source path")
    except IntegrityError as e:
        hint = " (not NFC-normalized)" if unicodedata.normalize("NFC", rel) != rel else ""
        raise InvalidInputError(f"{e}{hint}") from e


# O_NONBLOCK: opening a FIFO swapped in after the scan must not wait for a writer (no
# deadline could end that wait); O_NOFOLLOW: nor read through a symlink swapped in.


def open_source(path: str | Path) -> int:
    """A descriptor on the regular file the scan saw at ``path``, a real path (no buffered
    file object: 2x faster). Gone, no longer a regular file, or reached through a link:
    InvalidInputError, as for any file that changed while it was being published."""
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as e:
        raise _unopened(path, e) from e
    why = None if stat.S_ISREG(os.fstat(fd).st_mode) else "no longer a regular file"
    if why is None and _opened(fd) not in (None, os.fspath(path)):
        why = "a folder on its path was swapped for a link"
    if why is not None:
        os.close(fd)
        raise InvalidInputError(f"{path}: changed while it was being published ({why})")
    return fd


def open_in(path: str, folders: SourceFolders) -> int:
    """A descriptor on ``path``, opened in its folder as held in ``folders`` (checked once
    a folder, not a file) with O_NOFOLLOW | O_NONBLOCK, but not checked to be a regular
    file: for a reader that reads it at once, all of it, refuses a read that fails or is
    not its size, then checks it unchanged (:func:`check_unchanged`), which a FIFO or a
    folder swapped in fails anyway (a second fstat per file, before the read, was a tenth
    of reading 100,000 small files). Errors as :func:`open_source`'s."""
    parent, _, name = path.rpartition("/")
    try:
        return os.open(name, READ_FLAGS, dir_fd=folders.held(parent))
    except OSError as e:
        raise _unopened(path, e) from e


def _unopened(path: str | Path, e: OSError) -> InvalidInputError:
    if isinstance(e, PermissionError):  # there, but not ours to read: not a change
        return InvalidInputError(f"{path}: cannot be read ({e.strerror})")
    return InvalidInputError(f"{path}: changed while it was being published ({e.strerror})")


def _swapped(path: str) -> InvalidInputError:
    return InvalidInputError(
        f"{path}: changed while it was being published (a folder on its path was swapped "
        "for a link)"
    )


class SourceFolders:
    """The folder of the files being opened, held open (one at a time: files come in path
    order) once checked to be the real path the scan saw, so that each file is opened in
    it (``dir_fd``: a folder swapped for a link after the check is not followed either)
    and the check, a readlink in /proc, is made once a folder rather than once a file
    (0.45 s of 100,000 small files' publish). Close it after use."""

    def __init__(self) -> None:
        self._path, self._fd = "", -1

    def held(self, path: str) -> int:
        """A descriptor on the folder ``path``; OSError if it cannot be opened, and
        InvalidInputError if it is not the folder at that real path (swapped for a link)."""
        if path != self._path:
            self.close()
            try:
                fd = os.open(path, _FOLDER_FLAGS)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
                    raise _swapped(path) from e  # the folder itself
                raise
            if _opened(fd) not in (None, path):  # a folder above it
                os.close(fd)
                raise _swapped(path)
            self._path, self._fd = path, fd
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._path, self._fd = "", -1


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _opened(fd: int) -> str | None:
    """The path the kernel resolved ``fd`` to (O_NOFOLLOW covers only the last component),
    or None where there is no /proc to ask."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def check_still_as_scanned(files: Iterable[SourceFile], check: Callable[[], None]) -> None:
    """InvalidInputError unless each of ``files`` (files the stamp index let a publish
    skip: never read, so :func:`check_unchanged` never ran on them) still has the stamp the
    scan saw, once every other file is read. Without it a writer that changed a file the
    scan had passed, then one it had not, had the publish record a mix of its states that
    was never on disk, where a publish reading every file refused it."""
    for f in files:
        check()
        try:
            st = os.lstat(f.path)
            now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, st.st_mode)
        except OSError:
            now = None  # removed, or a folder on its path is gone
        if now != f.stamp:
            raise InvalidInputError(
                f"{f.path}: changed while the folder was being published (written to after "
                "the scan saw it)"
            )


def check_unchanged(fd: int, seen: SourceFile) -> None:
    """InvalidInputError unless the file open at ``fd``, read to its end, still has the
    size, mtime and ctime the scan saw: a write while it was read (a same-size rewrite in
    place, which no size check sees) could have given bytes it never held, and a file
    replaced has another ctime. Every write sets ctime to the clock, which user space cannot
    set back; a write within the same clock tick as the one the scan saw (a few ms, a file
    being written as it was scanned) is what this cannot tell apart. The inode is not
    compared: a FUSE file system may number a file anew once the kernel forgets it."""
    st = os.fstat(fd)
    if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (seen.size, *seen.times):
        raise InvalidInputError(
            f"{seen.path}: changed while it was being published (written to as it was read)"
        )
