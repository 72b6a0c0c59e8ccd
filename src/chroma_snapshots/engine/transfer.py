"""Checkout mechanics: plan coalesced pack reads, then verify and place every chunk.

A checkout needs some set of chunks. They are grouped by pack and sorted by
offset; neighbours closer than ``max_gap`` are merged into one ranged read
(reading a little waste beats a round trip), and reads are capped at
``max_read`` so a whole pack is still fetched as several parallel requests.

Every write's count is checked; a failed local write is CacheFullError (disk or quota
full) or LocalDiskError, never a raw OSError. Reads still running when a call fails or
times out are abandoned and only ever fill buffers of their own: the Placer refuses
writes once closed and closes its descriptors after the last write in progress (a closed
descriptor's number is reused by the process's next ``open``).
"""

from __future__ import annotations

import errno
import os
import threading
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chroma_snapshots.engine.chunking import decode_chunk
from chroma_snapshots.engine.deadline import Deadline, wait_all
from chroma_snapshots.engine.localcopy import IntactSources, copy_intact, copy_runs
from chroma_snapshots.engine.models import Chunk, Manifest
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.validation import sha256_hex
from chroma_snapshots.errors import CacheFullError, IntegrityError, LocalDiskError, SnapshotError

Buffer = bytes | memoryview
_RUN_CHUNKS = 16  # chunks per pwritev (1 MiB): 16 MiB writes took 5x the system time here

_LOCAL_SLICE = 64  # chunks a worker reuses per task: 4 MiB in memory at a time
DEFAULT_MAX_GAP = 256 << 10
DEFAULT_MAX_READ = 8 << 20


@dataclass(frozen=True)
class Read:
    """One ranged read of a pack, and the chunks it carries."""

    pack: str
    start: int
    end: int
    chunks: tuple[Chunk, ...]


def plan_reads(
    chunks: Iterable[Chunk], *, max_gap: int = DEFAULT_MAX_GAP, max_read: int = DEFAULT_MAX_READ
) -> list[Read]:
    """Coalesce the chunks' byte ranges into as few reads as the gap and size limits allow.

    No read is longer than ``max_read``: read buffers are sized from it, never from a
    declared length, so a chunk declaring more is refused (IntegrityError)."""
    by_pack: dict[str, list[Chunk]] = defaultdict(list)
    for c in chunks:
        if c.length > max_read:
            raise IntegrityError(
                f"chunk {c.hash[:12]} declares {c.length} stored bytes, more than a read "
                f"may hold ({max_read})"
            )
        by_pack[c.pack].append(c)
    reads: list[Read] = []
    for pack, cs in sorted(by_pack.items()):
        cs.sort(key=lambda c: c.offset)
        group = [cs[0]]
        for c in cs[1:]:
            end = group[-1].offset + group[-1].length
            if c.offset - end <= max_gap and c.offset + c.length - group[0].offset <= max_read:
                group.append(c)
            else:
                reads.append(_read(pack, group))
                group = [c]
        reads.append(_read(pack, group))
    return reads


def _read(pack: str, group: list[Chunk]) -> Read:
    return Read(pack, group[0].offset, max(c.offset + c.length for c in group), tuple(group))


def disk_error(err: OSError, path: Path | str, what: str) -> SnapshotError:
    """A local file operation's OSError as the documented error, keeping errno and path:
    CacheFullError when the disk or the quota is full, else LocalDiskError."""
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    cls = CacheFullError if full else LocalDiskError
    return cls(err.errno, f"{what}: {err.strerror or err}", str(path))


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
    """Write all ``size`` bytes of ``bufs`` at ``offset``. The kernel may write less than
    asked without an error (a filling disk does): write the rest, and the next call says
    why it cannot; a call that writes nothing and raises nothing is an I/O error."""
    written = os.pwritev(fd, bufs, offset)
    while written < size:  # rare: a full write is the one comparison above
        if written <= 0:
            raise OSError(errno.EIO, f"write made no progress at offset {offset}")
        bufs, offset, size = _skip(bufs, written), offset + written, size - written
        written = os.pwritev(fd, bufs, offset)


def _skip(bufs: Sequence[Buffer], n: int) -> list[Buffer]:
    """``bufs`` without their first ``n`` bytes (views, no copies)."""
    for i, b in enumerate(bufs):
        if n < len(b):
            return [memoryview(b)[n:], *bufs[i + 1 :]]
        n -= len(b)
    return []


class LocalChunks:
    """Chunks already on local disk: files of other materialized versions (or of a damaged
    copy being repaired). Every read is hash-verified, so a stale or modified file can cost
    a download but never a wrong byte. Safe to read from several threads; ``close`` when done.
    """

    _MAX_OPEN = 64  # files kept open: reads walk files in order, so a small LRU suffices

    def __init__(self) -> None:
        self._where: dict[str, list[tuple[Path, int, int]]] = defaultdict(list)
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False  # a read abandoned at a deadline must not reopen files
        self.intact = IntactSources()

    def add_tree(
        self,
        root: Path,
        manifest: Manifest,
        paths: Iterable[str] | None = None,
        *,
        intact: Callable[[str], bool] | None = None,
    ) -> None:
        """Offer the chunks of ``manifest``'s files (or just ``paths``) found under ``root``.

        ``intact(relpath)`` says a file still holds the bytes it was verified with (the
        cache's stamps): such files' unchanged runs are copied in the kernel, unread and
        unhashed (engine/localcopy.py states what that trusts); all others are verified."""
        if intact is not None:
            self.intact.add_tree(root, manifest, intact)
        wanted = None if paths is None else set(paths)
        for f in manifest.files:
            if wanted is None or f.path in wanted:
                path = root / f.path  # once per file: building Paths per chunk cost 0.6 s/GiB
                for i, h in enumerate(f.chunks):
                    size = manifest.chunks[h].size
                    self._where[h].append((path, i * manifest.chunk_size, size))

    def __contains__(self, digest: str) -> bool:
        return digest in self._where

    def read(self, digest: str) -> bytes | None:
        """The chunk's bytes if some local copy still hashes right, else None."""
        for path, offset, size in self._where.get(digest, ()):
            try:
                with self._lock:  # pread under the lock: the LRU may close an fd any time
                    if self._closed:
                        return None
                    raw = os.pread(self._fd(path), size, offset)
            except OSError:
                continue
            if len(raw) == size and sha256_hex(raw) == digest:
                return raw
        return None

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
            if len(self._fds) > self._MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        self._fds.move_to_end(path)
        return fd

    def close(self) -> None:
        """Close the files opened for reading (idempotent); later reads find nothing."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, OrderedDict()
        for fd in fds.values():
            os.close(fd)


class Placer:
    """Writes verified chunks into the files of a manifest being materialized under ``root``.

    ``damaged`` (file path -> chunk indexes) restricts the work to those positions
    of files that already exist at the right size: repairing a checkout in place.

    Once ``close`` is called no write starts, and the descriptors are closed only when
    the writes already in progress are done (by the last of them): a worker abandoned at
    a deadline can never write through a descriptor number the process has reused.
    """

    def __init__(
        self, root: Path, manifest: Manifest, damaged: Mapping[str, Sequence[int]] | None = None
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.files = [f for f in manifest.files if damaged is None or f.path in damaged]
        self.positions = [
            (f, list(range(len(f.chunks)) if damaged is None else damaged[f.path]))
            for f in self.files
        ]
        self.targets: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for f, indexes in self.positions:
            for i in indexes:
                self.targets[f.chunks[i]].append((f.path, i * manifest.chunk_size))
        self._fds: dict[str, int] = {}
        self._left = Counter(path for where in self.targets.values() for path, _ in where)
        self._lock = threading.Lock()
        self._writing = 0  # place_many calls in progress
        self._closed = False

    def create_files(self) -> None:
        """Create every directory and every file at its final size (sparse until filled)."""
        with local_io(self.root, "creating the checkout's directories"):
            for d in self.manifest.dirs:
                (self.root / d).mkdir(parents=True, exist_ok=True)
        for f in self.files:
            path = self.root / f.path
            with local_io(path, "creating a file of the checkout"):
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as fh:
                    fh.truncate(f.size)

    def place(self, digest: str, raw: Buffer) -> int:
        """Write one verified chunk everywhere it occurs; returns bytes written."""
        return self.place_many([(digest, raw)])

    def place_many(self, chunks: Sequence[tuple[str, Buffer]]) -> int:
        """Write verified chunks everywhere they occur; returns bytes written.

        Chunks that land next to each other in a file go out in one ``pwritev``: a pack
        holds chunks in file order, so an 8 MiB read is typically one system call, not
        128 (per-chunk open/pwrite/close was half of a checkout's CPU time)."""
        with self._write_guard():
            return self._write_runs(chunks)

    def copy_from(self, relpath: str, src: int, runs: list[tuple[int, int, int]], cs: int) -> None:
        """Copy runs of chunks from the intact file ``src`` to the same offsets of
        ``relpath`` (see engine/localcopy.py), under the same rules as ``place_many``; the
        caller reports what it copied with ``mark_placed`` once the source checked out."""
        with self._write_guard():
            try:
                copy_runs(src, self._fd(relpath), runs, cs)
            except OSError as e:
                raise disk_error(e, self.root / relpath, "copying into the checkout") from e

    def mark_placed(self, done: Iterable[tuple[str, list[int]]]) -> None:
        """Drop chunk positions already written by ``copy_from`` from the work left."""
        done = [(relpath, positions) for relpath, positions in done if positions]
        cs = self.manifest.chunk_size
        gone = {(relpath, i * cs) for relpath, positions in done for i in positions}
        for digest in list(self.targets):
            left = [where for where in self.targets[digest] if where not in gone]
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
            _close_all(fds)

    def _write_runs(self, chunks: Sequence[tuple[str, Buffer]]) -> int:
        writes = sorted(
            (relpath, offset, raw)
            for digest, raw in chunks
            for relpath, offset in self.targets[digest]
        )
        written, i = 0, 0
        while i < len(writes):
            relpath, start, first = writes[i]
            bufs, end = [first], start + len(first)
            i += 1
            while (
                i < len(writes)
                and writes[i][0] == relpath
                and writes[i][1] == end
                and len(bufs) < _RUN_CHUNKS
            ):
                bufs.append(writes[i][2])
                end += len(writes[i][2])
                i += 1
            self._write_run(relpath, bufs, start, end - start)
            written += end - start
            self._wrote(relpath, len(bufs))
        return written

    def _write_run(self, relpath: str, bufs: list[Buffer], start: int, size: int) -> None:
        try:
            pwrite_all(self._fd(relpath), bufs, start, size)
        except OSError as e:
            raise disk_error(e, self.root / relpath, "writing the checkout") from e

    def _wrote(self, relpath: str, count: int) -> None:
        # Close a file once its last chunk is in: open files stay bounded by the reads in
        # flight, not by the number of files (a low RLIMIT_NOFILE must not fail a checkout).
        with self._lock:
            self._left[relpath] -= count
            fd = self._fds.pop(relpath) if self._left[relpath] <= 0 else None
        if fd is not None:
            os.close(fd)

    def _fd(self, relpath: str) -> int:
        fd = self._fds.get(relpath)
        if fd is None:
            with self._lock:  # several reads may open the same file at once
                fd = self._fds.get(relpath)
                if fd is None:
                    fd = self._fds[relpath] = os.open(self.root / relpath, os.O_WRONLY)
        return fd

    def _take_fds(self) -> dict[str, int]:
        fds, self._fds = self._fds, {}
        return fds

    def close(self) -> None:
        """Refuse further writes and close the files (idempotent); with writes still in
        progress, the last of them closes the files when it is done."""
        with self._lock:
            self._closed = True
            fds: dict[str, int] = self._take_fds() if not self._writing else {}
        _close_all(fds)

    def finish(self) -> None:
        """Close the files and apply file modes once all data is in place."""
        self.close()
        for f in self.files:
            with local_io(self.root / f.path, "setting a file's mode"):
                os.chmod(self.root / f.path, f.mode)


def _close_all(fds: Mapping[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)


# Returns the read's bytes, in a buffer the calling worker owns (and may reuse for its
# next read): a read abandoned at a deadline then writes into nothing shared.
Fetch = Callable[[Read], Buffer]


def fetch_and_place(
    reads: list[Read],
    fetch: Fetch,
    placer: Placer,
    *,
    executor: Executor,
    deadline: Deadline,
    stats: StatsRecorder,
    progress: Progress | None,
) -> None:
    """Run the reads in parallel; verify each chunk's hash before it lands in a file.

    Returns once every read is placed; raises the first failure, or StorageTimeoutError
    at the deadline (reads still running are abandoned: the placer refuses them)."""
    total = sum(r.end - r.start for r in reads)
    done = [0]
    done_lock = threading.Lock()  # reads finish on several threads at once

    def run(r: Read) -> None:
        deadline.check(f"reading pack {r.pack[:12]}")
        data = memoryview(fetch(r))
        if len(data) != r.end - r.start:
            raise IntegrityError(
                f"pack {r.pack[:12]}: short read ({len(data)} of {r.end - r.start})"
            )
        _decode_and_place(r, data, placer)
        stats.add(bytes_downloaded=len(data), requests=1, chunks_transferred=len(r.chunks))
        if progress is not None:
            with done_lock:
                done[0] += len(data)
                so_far = done[0]
            progress(so_far, total)

    wait_all([executor.submit(run, r) for r in reads], deadline, "reading packs")


def _decode_and_place(r: Read, data: memoryview, placer: Placer) -> None:
    """Verify the read's chunks and place them in batches. Compressed chunks decompress
    into this worker's own arena (reused; a batch is placed before the arena is reused),
    so memory stays ``_ARENA_BYTES`` a worker and no chunk costs a fresh allocation."""
    arena = _arena(placer.manifest.chunk_size)
    batch: list[tuple[str, Buffer]] = []
    used = 0
    for c in r.chunks:
        stored = data[c.offset - r.start : c.offset - r.start + c.length]
        if c.codec != "none" and used + c.size > len(arena):
            placer.place_many(batch)
            batch, used = [], 0
        raw = decode_chunk(c, stored, arena[used:] if c.codec != "none" else None)
        used += c.size if c.codec != "none" else 0
        batch.append((c.hash, raw))
    placer.place_many(batch)


_ARENA_BYTES = 1 << 20  # a pwritev's worth (_RUN_CHUNKS chunks at the default size)
_WORKER = threading.local()


def _arena(chunk_size: int) -> memoryview:
    """This thread's decompression arena: at least one chunk, reused for every read."""
    arena: memoryview | None = getattr(_WORKER, "arena", None)
    if arena is None or len(arena) < chunk_size:
        arena = _WORKER.arena = memoryview(bytearray(max(_ARENA_BYTES, chunk_size)))
    return arena


def place_local(
    placer: Placer,
    local: LocalChunks | None,
    stats: StatsRecorder,
    *,
    executor: Executor,
    deadline: Deadline,
    close: bool = True,
) -> list[Chunk]:
    """Fill what local copies can, in parallel slices (hashing releases the GIL); return
    the chunks that still have to be downloaded. ``close=False`` leaves ``local`` open
    for the caller to close (it still reads delta bases from it)."""
    if local is not None and local.intact:
        tasks = list(local.intact.plan(placer.positions, placer.manifest))
        done = copy_intact(
            tasks,
            placer.copy_from,
            executor=executor,
            deadline=deadline,
            stats=stats,
            chunk_size=placer.manifest.chunk_size,
        )
        placer.mark_placed(done)
    wanted = list(placer.targets)
    if local is None:
        return [placer.manifest.chunks[h] for h in wanted]

    def fill(part: list[str]) -> list[str]:
        deadline.check("reusing local chunks")
        found: list[tuple[str, Buffer]] = []
        missing = []
        for h in part:
            raw = local.read(h) if h in local else None
            if raw is None:
                missing.append(h)
            else:
                found.append((h, raw))
        stats.add(bytes_reused=placer.place_many(found))
        return missing

    parts = [wanted[i : i + _LOCAL_SLICE] for i in range(0, len(wanted), _LOCAL_SLICE)]
    try:
        found = wait_all([executor.submit(fill, p) for p in parts], deadline, "reusing chunks")
    finally:
        if close:
            local.close()  # an abandoned slice then reads nothing more (see LocalChunks.read)
    missing = [h for part in found for h in part]
    return [placer.manifest.chunks[h] for h in missing]
