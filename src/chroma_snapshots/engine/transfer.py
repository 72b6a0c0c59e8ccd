"""Checkout mechanics: plan coalesced pack reads, then verify and place every chunk.

A checkout needs some set of chunks. They are grouped by pack and sorted by
offset; neighbours closer than ``max_gap`` are merged into one ranged read
(reading a little waste beats a round trip), and reads are capped at
``max_read``: 8 MiB read whole into a worker's buffer, or, from a backend that
streams (S3), 32 MiB (a whole pack) streamed through a 1 MiB buffer per worker
(``engine/streaming.py``).

Reads still running when a call fails or times out are abandoned and only ever fill
buffers of their own; the :class:`~chroma_snapshots.engine.placer.Placer` they write
through refuses writes once closed.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from chroma_snapshots.engine.beneath import FileId, open_regular
from chroma_snapshots.engine.bundles import members, reader_under, rebuild
from chroma_snapshots.engine.chunkids import chunk_ok, short_id
from chroma_snapshots.engine.chunking import decode_chunk
from chroma_snapshots.engine.deadline import Deadline, wait_all
from chroma_snapshots.engine.localcopy import IntactSources, Stamp, copy_intact
from chroma_snapshots.engine.models import Chunk, FileEntry, Manifest, is_slice
from chroma_snapshots.engine.placer import Buffer, Placer
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.ramp import Ramp
from chroma_snapshots.errors import IntegrityError

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


class LocalChunks:
    """Chunks already on local disk: files of other materialized versions (or of a damaged
    copy being repaired). Every read is hash-verified, so a stale or modified file can cost
    a download but never a wrong byte. Safe to read from several threads; ``close`` when done.
    """

    _MAX_OPEN = 64  # files kept open: reads walk files in order, so a small LRU suffices

    def __init__(self) -> None:
        self._where: dict[str, list[tuple[Path, int, int]]] = defaultdict(list)
        # bundles (engine.bundles): put together from their member files, then verified
        self._bundles: dict[str, list[tuple[Path, list[FileEntry], int]]] = defaultdict(list)
        self._at: dict[tuple[str, int], str] = {}  # (pack, offset) -> hash, for chain links
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
        stamps: Mapping[str, Stamp] | None = None,
    ) -> None:
        """Offer the chunks of ``manifest``'s files (or just ``paths``) found under ``root``.

        ``stamps`` are the files' stamps when they were verified (the cache's): a file that
        still has its stamp lends its unchanged runs to a copy in the kernel, unread and
        unhashed (engine/localcopy.py states what that trusts); all others are verified."""
        if stamps is not None:
            self.intact.add_tree(root, manifest, stamps)
        wanted = None if paths is None else set(paths)
        for h, fs in members(manifest).items():
            if wanted is None or all(f.path in wanted for f in fs):
                self._bundles[short_id(h)].append((root, fs, manifest.chunks[h].size))
        for f in manifest.files:
            if (wanted is None or f.path in wanted) and not is_slice(f, manifest.chunks):
                path = root / f.path  # once per file: building Paths per chunk cost 0.6 s/GiB
                for i, h in enumerate(f.chunks):
                    c = manifest.chunks[h]
                    self._where[short_id(h)].append((path, i * manifest.chunk_size, c.size))
                    # the first tree offered (the newest version) says what is there
                    self._at.setdefault((c.pack, c.offset), h)

    def __contains__(self, digest: str) -> bool:
        key = short_id(digest)  # ids of both lengths meet under the short one
        return key in self._where or key in self._bundles

    def hash_at(self, pack: str, offset: int) -> str | None:
        """The hash of the chunk a local copy's manifest stores at ``offset`` of ``pack``:
        how a delta chain link known only by place (format 2 layout 1) is found locally."""
        return self._at.get((pack, offset))

    def read(self, digest: str) -> bytes | None:
        """The chunk's bytes if some local copy still hashes right, else None."""
        for path, offset, size in self._where.get(short_id(digest), ()):
            try:
                with self._lock:  # pread under the lock: the LRU may close an fd any time
                    if self._closed:
                        return None
                    raw = os.pread(self._fd(path), size, offset)
            except OSError:
                continue
            if len(raw) == size and chunk_ok(raw, digest):
                return raw
        for root, fs, size in self._bundles.get(short_id(digest), ()):
            if self._closed:
                return None
            got = rebuild(reader_under(root), fs, size)
            if got is not None and chunk_ok(got, digest):
                return got
        return None

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = open_regular(path)
            if len(self._fds) > self._MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        self._fds.move_to_end(path)
        return fd

    def reopened(self) -> LocalChunks:
        """The same chunks with files of their own to open and close: each attempt at a
        materialization closes its own (see :class:`Placement`), and a retry on another
        store still reuses the local copies."""
        twin = LocalChunks()
        twin._where, twin._at, twin.intact = self._where, self._at, self.intact
        twin._bundles = self._bundles
        return twin

    def close(self) -> None:
        """Close the files opened for reading (idempotent); later reads find nothing."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, OrderedDict()
        for fd in fds.values():
            os.close(fd)


@dataclass(frozen=True)
class Placement:
    """What a materialization writes, whoever asked for it: every chunk of ``manifest``'s
    files under ``root``, or with ``only`` just those chunk positions of files already there.
    ``reuse`` offers local copies of chunks (each verified before use, or copied only from
    files it vouches for): only the rest is downloaded. A store that carries out a placement
    opens ``reuse`` afresh for each attempt and closes it before returning. ``root_id``:
    the (device, inode) ``root`` must have (a work folder made for it, engine/beneath.py).
    ``made`` is filled with the files made (path -> FileId), for checks after the writes."""

    root: Path
    manifest: Manifest
    reuse: LocalChunks | None = None
    only: Mapping[str, Sequence[int]] | None = None
    root_id: tuple[int, int] | None = None
    made: dict[str, FileId] = field(default_factory=dict)


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
    streams: Ramp,
    then: Sequence[Read] = (),
) -> None:
    """Run the reads in parallel (as many at once as ``streams`` finds worth it); verify
    each chunk's hash before it lands in a file. The reads ``then`` start once every one
    of ``reads`` is placed.

    Returns once every read is placed; raises the first failure, or StorageTimeoutError
    at the deadline (reads still running are abandoned: the placer refuses them)."""
    report = byte_counter(progress, [*reads, *then])

    def run(r: Read) -> None:
        deadline.check(f"reading pack {r.pack[:12]}")
        data = memoryview(fetch(r))
        streams.add(len(data))
        if len(data) != r.end - r.start:
            raise IntegrityError(
                f"pack {r.pack[:12]}: short read ({len(data)} of {r.end - r.start})"
            )
        decode_and_place(r, data, placer)
        stats.add(bytes_downloaded=len(data), requests=1, chunks_transferred=len(r.chunks))
        report(len(data))

    run_phases(run, (reads, then), executor, deadline, streams)


def byte_counter(progress: Progress | None, reads: Iterable[Read]) -> Callable[[int], None]:
    """``add(n)``: ``n`` more bytes of ``reads`` done, reported to ``progress`` (reads
    finish on several threads at once)."""
    if progress is None:
        return lambda n: None
    total, done, lock = sum(r.end - r.start for r in reads), [0], threading.Lock()

    def add(n: int) -> None:
        with lock:
            done[0] += n
            so_far = done[0]
        progress(so_far, total)

    return add


def run_phases(
    run: Callable[[Read], None],
    phases: Iterable[Sequence[Read]],
    executor: Executor,
    deadline: Deadline,
    streams: Ramp,
) -> None:
    """``run`` every read of each phase in parallel, as many at once as ``streams``
    allows, a phase only once the one before it is done (a barrier: the delta stash has
    every delta before the keyframes below them arrive, and uses those as they pass
    instead of keeping them). Reads still waiting for a slot when this returns or
    raises never start."""

    def slotted(r: Read) -> None:
        with streams.slot() as granted:
            if not granted:
                return  # the reads have ended (a failure, the deadline): this one never starts
            try:
                run(r)
            except BaseException:
                streams.close()  # before this slot frees: no waiting read takes it
                raise

    try:
        for reads in phases:
            wait_all([executor.submit(slotted, r) for r in reads], deadline, "reading packs")
    finally:
        streams.close()


def to_place(chunks: Iterable[Chunk], placer: Placer) -> tuple[Chunk, ...]:
    """The chunks of a read that go to files as they arrive: not deltas (applied once
    their bases are at hand) nor chain links no file position wants (read only so that
    deltas can be applied)."""
    return tuple(c for c in chunks if c.base is None and c.hash in placer.targets)


def decode_and_place(r: Read, data: memoryview, placer: Placer) -> None:
    """Verify the read's chunks and place them in batches. Compressed chunks decompress
    into this worker's own arena (reused; a batch is placed before the arena is reused),
    so memory stays ``_ARENA_BYTES`` a worker and no chunk costs a fresh allocation. At
    most ``placer.gate`` workers do this at once (see placer.placing_threads)."""
    arena = _arena(placer.manifest.chunk_size)
    batch: list[tuple[str, Buffer]] = []
    used = 0
    with placer.gate:  # the receiving goes on in every worker; this part in a few
        for c in r.chunks:
            stored = data[c.offset - r.start : c.offset - r.start + c.length]
            if c.codec != "none" and used + c.size > len(arena):
                placer.place_many(batch)
                batch, used = [], 0
            raw = decode_chunk(c, stored, arena[used:] if c.codec != "none" else None)
            used += c.size if c.codec != "none" else 0
            batch.append((c.hash, raw))
        placer.place_many(batch)


_ARENA_BYTES = 1 << 20  # 16 chunks of the default size: a batch places with one lock round
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
