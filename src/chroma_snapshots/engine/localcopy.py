"""Copying unchanged regions from intact local copies without reading them into Python.

A refresh after a small change needs almost every chunk of the new version, and the
cache holds them in the previous version's files, at the same offsets of the same
paths. Reading each chunk back, re-hashing it and writing it out again made the local
half of an incremental checkout cost about as much as a cold one. Here a file whose
stamp is intact (the caller's ``intact`` check: size, mtime, mode and ctime as they were
right after the file was written and verified, the check a warm checkout serves on)
lends its runs of chunks that the new version has at the same offsets to
``os.copy_file_range``: the kernel copies (or, on XFS and btrfs, shares) the blocks, and
no byte passes through the interpreter or the hash. On ext4 the kernel still copies every
byte through the page cache, so a cache builds a new version by patching an older one in
place when it may (stores/cache/patch.py); this copy is for when it may not (the older
version is pinned, named by a ref, or kept for ``stale_ok``).

Threat model: the copy trusts the same thing a warm checkout does, that a file nobody
wrote to since it was verified still holds the verified bytes; a write changes the ctime
(write(2) and a first store through mmap update it before any byte lands), which no
consumer can put back. The source is checked before and again after its runs are
copied, so a consumer writing to it meanwhile makes those runs be redone through the
verified path. Not covered, as for a warm checkout: a change in the same clock tick as
the stamp, writes to the block device under the filesystem, and media corruption.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from chroma_snapshots.engine.beneath import open_regular
from chroma_snapshots.engine.chunkids import short_id
from chroma_snapshots.engine.deadline import Deadline, wait_all
from chroma_snapshots.engine.models import FileEntry, Manifest
from chroma_snapshots.engine.progress import StatsRecorder

# errnos meaning "this filesystem pair cannot do it": fall back to reading and hashing
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_TASK_BYTES = 64 << 20  # runs per task: tasks spread over the pool, each a few calls


Stamp = tuple[int, int, int, int, int]  # size, mtime_ns, permission bits, ctime_ns, inode


def stamp_of_stat(st: os.stat_result) -> Stamp | None:
    """A regular file's stamp (None for anything else): what changes when it is written,
    and which file it is. The inode because renaming a folder changes no ctime of the
    files in it, and a build writes many files in one clock tick: two folders of files of
    the same names and sizes, swapped by a consumer, kept every stamp."""
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_mode & 0o777, st.st_ctime_ns, st.st_ino)


@dataclass(frozen=True)
class IntactFile:
    """A verified local file: where it is, its chunks, and its stamp when it was verified."""

    path: Path
    chunks: tuple[str, ...]
    stamp: Stamp
    at: int = 0  # where a bundled file starts in its chunk (engine.bundles)
    size: int = 0
    chunk_size: int = 0  # of its manifest: the same chunk is elsewhere under another size


@dataclass(frozen=True)
class _Task:
    relpath: str
    source: IntactFile
    runs: tuple[tuple[int, int, int], ...]  # (first index, chunk count, bytes)


class IntactSources:
    """Intact files of other local versions, by path, newest version first."""

    def __init__(self) -> None:
        self._by_path: dict[str, list[IntactFile]] = {}

    def add_tree(self, root: Path, manifest: Manifest, stamps: Mapping[str, Stamp]) -> None:
        """Offer the files of ``manifest`` under ``root`` whose stamps are still those in
        ``stamps`` (recorded when they were verified); add the newest version first. The
        stamp is checked again on the opened file, before and after its runs are copied."""
        for f in manifest.files:
            want = stamps.get(f.path)
            if want is not None and _stamp_at(root / f.path) == want:
                entry = IntactFile(root / f.path, f.chunks, want, f.at, f.size,
                                   manifest.chunk_size)  # fmt: skip
                self._by_path.setdefault(f.path, []).append(entry)

    def __bool__(self) -> bool:
        return bool(self._by_path)

    def plan(self, files: list[tuple[FileEntry, list[int]]], manifest: Manifest) -> Iterator[_Task]:
        """Runs of chunk positions an intact file has at the same offsets, in tasks of about
        ``_TASK_BYTES``; each position is taken from the first source that has it."""
        for f, positions in files:
            todo = set(positions)
            for src in self._by_path.get(f.path, ()):
                same = sorted(i for i in todo if _same_piece(src, f, i, manifest.chunk_size))
                todo.difference_update(same)
                yield from _tasks(f, src, same, manifest)


def _stamp_at(path: Path) -> Stamp | None:
    try:
        return stamp_of_stat(os.lstat(path))
    except OSError:
        return None


def _same_piece(src: IntactFile, f: FileEntry, i: int, cs: int) -> bool:
    """Whether ``src`` holds the bytes of ``f``'s chunk position ``i`` at the same offset:
    the same chunk from the same place in it (a bundled file: the same ``at``), and at
    least as many of them."""
    if src.chunk_size != cs or i >= len(src.chunks):
        return False  # chunk i of another chunk size starts at another offset
    if short_id(src.chunks[i]) != short_id(f.chunks[i]):
        return False
    if i:
        return True  # at is 0 past the first chunk
    return src.at == f.at and min(cs, src.size) >= min(cs, f.size)


def _tasks(f: FileEntry, src: IntactFile, same: list[int], manifest: Manifest) -> Iterator[_Task]:
    runs: list[tuple[int, int, int]] = []
    size = 0
    cs = manifest.chunk_size
    for first, count in _consecutive(same):
        nbytes = min(f.size, (first + count) * cs) - first * cs  # a bundled file: its slice
        runs.append((first, count, nbytes))
        size += nbytes
        if size >= _TASK_BYTES:
            yield _Task(f.path, src, tuple(runs))
            runs, size = [], 0
    if runs:
        yield _Task(f.path, src, tuple(runs))


def _consecutive(indexes: list[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive integers in the sorted ``indexes``."""
    i = 0
    while i < len(indexes):
        j = i + 1
        while j < len(indexes) and indexes[j] == indexes[j - 1] + 1:
            j += 1
        yield indexes[i], j - i
        i = j


class _Unsupported(Exception):
    """copy_file_range cannot copy between these files: use the verified path."""


class _SourceFailed(Exception):
    """The source could not be read to the end: redo its runs the verified way."""


def copy_runs(src: int, dst: int, runs: list[tuple[int, int, int]], chunk_size: int) -> None:
    """Copy each (first index, count, bytes) run at the same offset in both files. A full
    disk raises OSError (the caller's write error); a source that fails or ends early
    raises _SourceFailed, a filesystem that cannot copy _Unsupported."""
    for first, _, nbytes in runs:
        offset, done = first * chunk_size, 0
        while done < nbytes:
            try:
                n = os.copy_file_range(src, dst, nbytes - done, offset + done, offset + done)
            except OSError as e:
                if e.errno in _DISK_FULL:
                    raise
                raise (_Unsupported if e.errno in _UNSUPPORTED else _SourceFailed)() from e
            if n <= 0:
                raise _SourceFailed
            done += n


def copy_intact(
    tasks: list[_Task],
    write: Callable[[str, int, list[tuple[int, int, int]], int], None],
    *,
    executor: Executor,
    deadline: Deadline,
    stats: StatsRecorder,
    chunk_size: int,
) -> list[tuple[str, list[int]]]:
    """Run the copy ``tasks`` in parallel through ``write(relpath, src_fd, runs,
    chunk_size)``; return (relpath, positions) of the runs copied from sources that were
    still intact afterwards. Anything else (a source changed, vanished or on a filesystem
    that cannot copy) is left for the verified path."""
    unsupported = [False]

    def run(t: _Task) -> tuple[str, list[int]]:
        deadline.check("copying unchanged chunks")
        if unsupported[0]:
            return t.relpath, []
        try:
            fd = open_regular(t.source.path)
        except OSError:  # evicted meanwhile (or a FIFO): downloads or other copies fill in
            return t.relpath, []
        try:
            # the stamp of the file opened, not of whatever its path leads to at another
            # moment: a folder swapped for a link in between cannot lend other bytes
            if stamp_of_stat(os.fstat(fd)) != t.source.stamp:
                return t.relpath, []
            write(t.relpath, fd, list(t.runs), chunk_size)
            if stamp_of_stat(os.fstat(fd)) != t.source.stamp:  # written to meanwhile: redo
                return t.relpath, []  # those runs the verified way
        except _Unsupported:
            unsupported[0] = True
            return t.relpath, []
        except _SourceFailed:
            return t.relpath, []
        finally:
            os.close(fd)
        stats.add(bytes_reused=sum(n for _, _, n in t.runs))
        return t.relpath, [i for first, count, _ in t.runs for i in range(first, first + count)]

    return wait_all([executor.submit(run, t) for t in tasks], deadline, "copying chunks")
