"""Placing verified chunks into the files of a version being materialized.

Every write's count is checked; a failed local write is CacheFullError (disk or quota
full) or LocalDiskError, never a raw OSError. The Placer refuses writes once closed and
closes its descriptors after the last write in progress (a closed descriptor's number is
reused by the process's next ``open``), so a read abandoned at a deadline cannot write
into an unrelated file.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from chroma_snapshots.engine.beneath import Beneath, FileId, FolderId, file_id
from chroma_snapshots.engine.deadline import checked
from chroma_snapshots.engine.dropbehind import SMALLEST, DropBehind
from chroma_snapshots.engine.localcopy import copy_runs
from chroma_snapshots.engine.models import Manifest
from chroma_snapshots.errors import CacheFullError, IntegrityError, LocalDiskError, SnapshotError

Buffer = bytes | memoryview
# Bytes handed to the kernel per write: 32 KiB, as s5cmd writes. A write fills page-cache
# folios of up to its own size (ext4 has large folios since Linux 6.16), and on the
# benchmark VM, whose free memory goes back to its host (free page reporting), larger
# folios have at times cost far more to fill: a 1 GiB cold checkout took 0.9-2.8 system s
# in 64 KiB writes against 0.7-1.2 in 32 KiB ones (12 runs in two rotations; 1.6-3.7 in
# 1 MiB ones on 2026-12-03). In ABBA pairs while memory was cold, 32 KiB saved the whole
# machine 1.32 CPU s and 0.77 s wall a GiB (8 of 8 pairs); warm, the two cost the same
# within noise (26 pairs). Why the smaller folios escape is not established:
# benchmarks/checkout_ab.py, benchmarks/RESULTS.md.
WRITE_BYTES = 32 << 10


def placing_threads() -> int:
    """How many threads may verify and place at once (:attr:`Placer.gate`): one per CPU
    this process may run on but one, which is left to the receiving; at least one. The
    downloads keep all their workers; more placing threads than that only take turns at
    the GIL and at the inode lock of the file they share, and wake each other across
    CPUs: on the 2-core benchmark VM, a 1 GiB chroma-shaped cold checkout used up to 0.7
    CPU s less with 2 than with 8, and 0.1 less with 1 than with 2, as fast (medians of
    alternating runs; one CPU: 1 and 2 the same. benchmarks/RESULTS.md)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def disk_error(err: OSError, path: Path | str, what: str) -> SnapshotError:
    """A local file operation's OSError as the documented error, keeping errno and path:
    CacheFullError when the disk or the quota is full, else LocalDiskError."""
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    cls = CacheFullError if full else LocalDiskError
    return cls(err.errno, f"{what}: {err.strerror or err}", str(path))


def raise_local(e: BaseException, path: Path, what: str) -> None:
    """A raw OSError as CacheFullError (disk full) or LocalDiskError, naming the file that
    failed if the OS said which (of a copy's two, the target), else ``path``; documented
    errors and other exceptions pass."""
    if isinstance(e, OSError) and not isinstance(e, SnapshotError):
        raise disk_error(e, e.filename2 or e.filename or path, what) from e


@contextmanager
def local_io(path: Path | str, what: str) -> Iterator[None]:
    """Raise a raw OSError of the block as :func:`disk_error` (documented errors pass)."""
    try:
        yield
    except SnapshotError:
        raise
    except OSError as e:
        raise disk_error(e, path, what) from e


def pwrite_all(fd: int, bufs: Sequence[Buffer], offset: int, size: int) -> None:
    """Write all ``size`` bytes of ``bufs`` at ``offset``, at most ``WRITE_BYTES`` a call."""
    if size <= WRITE_BYTES:
        _pwrite_exact(fd, bufs, offset, size)
        return
    for part, n in _slices(bufs):
        _pwrite_exact(fd, part, offset, n)
        offset += n


def _pwrite_exact(fd: int, bufs: Sequence[Buffer], offset: int, size: int) -> None:
    """One call's worth: the kernel may write less than asked without an error (a filling
    disk does), so write the rest, and the next call says why it cannot; a call that
    writes nothing and raises nothing is an I/O error."""
    while True:
        written = os.pwritev(fd, bufs, offset)
        if written == size:
            return
        if written <= 0:
            raise OSError(errno.EIO, f"write made no progress at offset {offset}")
        bufs, offset, size = _skip(bufs, written), offset + written, size - written


def _slices(bufs: Sequence[Buffer]) -> Iterator[tuple[list[Buffer], int]]:
    """``bufs`` cut into calls of ``WRITE_BYTES`` (the last may be shorter), each a list
    of views and its size: no copies."""
    part: list[Buffer] = []
    n = 0
    for b in bufs:
        view, pos, end = memoryview(b), 0, len(b)
        while pos < end:
            take = min(WRITE_BYTES - n, end - pos)
            part.append(view[pos : pos + take])
            n, pos = n + take, pos + take
            if n == WRITE_BYTES:
                yield part, n
                part, n = [], 0
    if n:
        yield part, n


def _skip(bufs: Sequence[Buffer], n: int) -> list[Buffer]:
    """``bufs`` without their first ``n`` bytes (views, no copies)."""
    for i, b in enumerate(bufs):
        if n < len(b):
            return [memoryview(b)[n:], *bufs[i + 1 :]]
        n -= len(b)
    return []


class Gate:
    """At most ``n`` threads inside ``with gate:`` at once. A semaphore built on C-level
    calls alone (a queue of ``n`` tokens): threading.Semaphore's Python-level condition
    cost 20 ms of held GIL per GiB, taken and given back at every 1 MiB window."""

    __slots__ = ("_tokens",)

    def __init__(self, n: int) -> None:
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(n):
            self._tokens.put(None)

    def __enter__(self) -> None:
        self._tokens.get()

    def __exit__(self, *exc: object) -> None:
        self._tokens.put(None)


class Placer:
    """Writes verified chunks into the files of a manifest being materialized under ``root``.

    ``damaged`` (file path -> chunk indexes) restricts the work to those positions
    of files that already exist at the right size: repairing a checkout in place.

    Once ``close`` is called no write starts, and the descriptors are closed only when
    the writes already in progress are done (by the last of them): a worker abandoned at
    a deadline can never write through a descriptor number the process has reused.

    ``drop_behind`` drops what is written from the page cache as the work goes
    (engine/dropbehind.py).
    """

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        damaged: Mapping[str, Sequence[int]] | None = None,
        root_id: FolderId | None = None,
        made: dict[str, FileId] | None = None,
        drop_behind: bool = False,
    ) -> None:
        self.root, self._root_id = root, root_id
        self._tree: Beneath | None = None  # opened at the first file (root may not exist)
        self.manifest = manifest
        self.files = [f for f in manifest.files if damaged is None or f.path in damaged]
        self.positions = [
            (f, list(range(len(f.chunks)) if damaged is None else damaged[f.path]))
            for f in self.files
        ]
        # chunk -> (file, offset in it, start in the chunk, bytes): a bundled file is the
        # slice [at, at + size) of its chunk (engine.bundles); other pieces a whole chunk
        self.targets: dict[str, list[tuple[str, int, int, int]]] = defaultdict(list)
        cs = manifest.chunk_size
        for f, indexes in self.positions:
            for i in indexes:
                where = (f.path, i * cs, f.at if i == 0 else 0, min(cs, f.size - i * cs))
                self.targets[f.chunks[i]].append(where)
        self._fds: dict[str, int] = {}
        self._ids = {} if made is None else made  # files made by create_files (FileId)
        self._modes = {f.path: f.mode for f in self.files}  # set as each file is complete
        self._left = Counter(where[0] for wheres in self.targets.values() for where in wheres)
        self._lock = threading.Lock()
        self._tree_lock = threading.Lock()  # (the placer's lock is held where files open)
        # held while a worker decodes, verifies and places what it received: its own per
        # materialization, so a worker abandoned at a deadline never holds up the next one
        self.gate = Gate(placing_threads())
        # files dropped behind the writer, and the descriptors of finished ones still open
        self._behind = DropBehind() if drop_behind else None
        self._dropped = {f.path for f in self.files if f.size >= SMALLEST} if drop_behind else set()
        self._writing = 0  # place_many calls in progress
        self._closed = False

    def create_files(self, check: Callable[[], None] = lambda: None) -> None:
        """Create every directory and every file at its final size (sparse until filled).
        ``check()`` runs every few files and may raise (a deadline: 20,000 small files
        take a second or more to create)."""
        with local_io(self.root, "creating the checkout's directories"):
            self.root.mkdir(parents=True, exist_ok=True)
            for d in self.manifest.dirs:
                self.tree.folder(d, make=True)
        done = 0
        try:
            for f in checked(self.files, check):
                # a file an earlier attempt left is emptied, once checked to be a file of
                # its own (O_TRUNC would cut a hard-linked one before any check)
                fd = self.tree.open(f.path, os.O_WRONLY | os.O_CREAT, parents=True)
                try:
                    self._ids[f.path] = file_id(fd)  # known again when opened to be filled
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, f.size)
                finally:
                    os.close(fd)
                done += 1
        except SnapshotError:
            raise
        except OSError as e:  # the path is made only then: 20,000 Paths cost 0.14 s
            path = self.root / self.files[done].path
            raise disk_error(e, path, "creating a file of the checkout") from e

    @property
    def tree(self) -> Beneath:
        """The checkout's folder, reached through descriptors: never through a link or
        into a mount (engine/beneath.py)."""
        with self._tree_lock:
            if self._tree is None:
                self._tree = Beneath(self.root, self._root_id)
            return self._tree

    def place(self, digest: str, raw: Buffer) -> int:
        """Write one verified chunk everywhere it occurs; returns bytes written."""
        return self.place_many([(digest, raw)])

    def place_many(self, chunks: Sequence[tuple[str, Buffer]]) -> int:
        """Write verified chunks everywhere they occur; returns bytes written.

        Chunks that land next to each other in a file are one run, written in calls of
        ``WRITE_BYTES`` (:func:`pwrite_all`): a pack holds chunks in file order, so small
        chunks share a call (per-chunk open/pwrite/close was half of a checkout's CPU
        time), and a run's descriptor, lock and count are looked at once, not per chunk."""
        with self._write_guard():
            return self._write_runs(chunks)

    def copy_from(self, relpath: str, src: int, runs: list[tuple[int, int, int]], cs: int) -> None:
        """Copy runs of chunks from the intact file ``src`` to the same offsets of
        ``relpath`` (see engine/localcopy.py), under the same rules as ``place_many``; the
        caller reports what it copied with ``mark_placed`` once the source checked out."""
        with self._write_guard():
            try:
                # its own descriptor, closed here: the file's is kept only by the writes that
                # complete it, and mark_placed comes after every copy (a tree of more files
                # than RLIMIT_NOFILE held them all open at once: EMFILE)
                fd = self.tree.open(relpath, os.O_WRONLY, known=self._ids.get(relpath))
                try:
                    copy_runs(src, fd, runs, cs)
                finally:
                    os.close(fd)
            except OSError as e:
                raise disk_error(e, self.root / relpath, "copying into the checkout") from e

    def mark_placed(self, done: Iterable[tuple[str, list[int]]]) -> None:
        """Drop chunk positions already written by ``copy_from`` from the work left."""
        done = [(relpath, positions) for relpath, positions in done if positions]
        cs = self.manifest.chunk_size
        gone = {(relpath, i * cs) for relpath, positions in done for i in positions}
        for digest in list(self.targets):
            left = [where for where in self.targets[digest] if where[:2] not in gone]
            if left:
                self.targets[digest] = left
            else:
                del self.targets[digest]
        for relpath, positions in done:
            self._wrote(relpath, len(positions))

    @contextmanager
    def _write_guard(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise SnapshotError("the checkout ended (failed or timed out); nothing written")
            self._writing += 1
        try:
            yield
        finally:
            with self._lock:
                self._writing -= 1
                last = self._closed and not self._writing
                fds: dict[str, int] = self._take_fds() if last else {}
            self._close_all(fds, last)

    def _write_runs(self, chunks: Sequence[tuple[str, Buffer]]) -> int:
        writes = sorted(
            (relpath, offset, _piece(raw, start, length))
            for digest, raw in chunks
            for relpath, offset, start, length in self.targets[digest]
        )
        written, i = 0, 0
        while i < len(writes):
            relpath, start, first = writes[i]
            bufs, end = [first], start + len(first)
            i += 1
            while i < len(writes) and writes[i][0] == relpath and writes[i][1] == end:
                bufs.append(writes[i][2])
                end += len(writes[i][2])
                i += 1
            self._write_run(relpath, bufs, start, end - start)
            written += end - start
            self._wrote(relpath, len(bufs))
        return written

    def _write_run(self, relpath: str, bufs: list[Buffer], start: int, size: int) -> None:
        try:
            fd = self._fd(relpath)
            pwrite_all(fd, bufs, start, size)
            if self._behind is not None and relpath in self._dropped:
                self._behind.wrote(fd, size)
        except OSError as e:
            raise disk_error(e, self.root / relpath, "writing the checkout") from e

    def _wrote(self, relpath: str, count: int) -> None:
        # Close a file once its last chunk is in: open files stay bounded by the reads in
        # flight, not by the number of files (a low RLIMIT_NOFILE must not fail a checkout).
        # Its mode is set then, through the descriptor: no path to resolve again.
        with self._lock:
            self._left[relpath] -= count
            fd = self._fds.pop(relpath, None) if self._left[relpath] <= 0 else None
            mode = self._modes.pop(relpath, None) if fd is not None else None
        if fd is not None:
            try:
                with local_io(self.root / relpath, "setting a file's mode"):
                    if mode is not None:
                        os.fchmod(fd, mode)
            finally:
                self._release(relpath, fd)

    def _release(self, relpath: str, fd: int) -> None:
        """Close a finished file's descriptor, or hand it to the drop-behind, which says
        which to close."""
        if self._behind is None or relpath not in self._dropped:
            os.close(fd)
            return
        for old in self._behind.finished(fd):
            os.close(old)

    def _fd(self, relpath: str) -> int:
        fd = self._fds.get(relpath)
        if fd is None:
            with self._lock:  # several reads may open the same file at once
                fd = self._fds.get(relpath)
                if fd is None:
                    known = self._ids.get(relpath)
                    fd = self._fds[relpath] = self.tree.open(relpath, os.O_WRONLY, known=known)
        return fd

    def _take_fds(self) -> dict[str, int]:
        fds, self._fds = self._fds, {}
        return fds

    def close(self) -> None:
        """Refuse further writes and close the files (idempotent); with writes still in
        progress, the last of them closes the files when it is done."""
        with self._lock:
            self._closed = True
            last = not self._writing
            fds: dict[str, int] = self._take_fds() if last else {}
        self._close_all(fds, last)

    def _close_all(self, fds: Mapping[str, int], tree: bool) -> None:
        for fd in fds.values():
            os.close(fd)
        if tree and self._behind is not None:  # finished files kept for a last call
            for fd in self._behind.drain():
                os.close(fd)
        if tree and self._tree is not None:
            self._tree.close()

    def finish(self, check: Callable[[], None] = lambda: None) -> None:
        """Apply the modes not yet set (a file's is set as its last chunk is written, and
        an empty file has none), check that every file made is still the one written, then
        close the files; all data is in place. ``check()`` runs every few files and may
        raise (a deadline, as in :meth:`create_files`)."""
        with self._lock:
            left = list(self._modes.items())
        for relpath, mode in checked(left, check):
            with local_io(self.root / relpath, "setting a file's mode"):
                self.tree.chmod(relpath, mode)
        # last: every file made is still the one written, nothing put in its place since
        for relpath, known in checked(list(self._ids.items()), check):
            with local_io(self.root / relpath, "checking the files written"):
                self.tree.check_made(relpath, known)
        self.close()


def _piece(raw: Buffer, start: int, length: int) -> Buffer:
    """The bytes of a verified chunk that go into one file (all of it, or a bundled
    file's slice: manifest validation keeps every slice inside its chunk)."""
    if start == 0 and length == len(raw):
        return raw
    if start + length > len(raw):
        raise IntegrityError(f"a slice [{start}, {start + length}) past a chunk of {len(raw)}")
    return memoryview(raw)[start : start + length]
