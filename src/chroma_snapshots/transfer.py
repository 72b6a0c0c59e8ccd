"""Checkout mechanics: plan coalesced pack reads, then verify and place every chunk.

A checkout needs some set of chunks. They are grouped by pack and sorted by
offset; neighbours closer than ``max_gap`` are merged into one ranged read
(reading a little waste beats a round trip), and reads are capped at
``max_read`` so a whole pack is still fetched as several parallel requests.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from .chunking import decode_chunk
from .deadline import Deadline
from .errors import IntegrityError
from .models import Chunk, Manifest
from .store import Progress, StatsRecorder
from .validation import sha256_hex

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
    """Coalesce the chunks' byte ranges into as few reads as the gap and size limits allow."""
    by_pack: dict[str, list[Chunk]] = defaultdict(list)
    for c in chunks:
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
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()

    def add_tree(self, root: Path, manifest: Manifest, paths: Iterable[str] | None = None) -> None:
        """Offer the chunks of ``manifest``'s files (or just ``paths``) found under ``root``."""
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
        """Close the files opened for reading (idempotent)."""
        with self._lock:
            fds, self._fds = self._fds, OrderedDict()
        for fd in fds.values():
            os.close(fd)


class Placer:
    """Writes verified chunks into the files of a manifest being materialized under ``root``.

    ``damaged`` (file path -> chunk indexes) restricts the work to those positions
    of files that already exist at the right size: repairing a checkout in place.
    """

    def __init__(
        self, root: Path, manifest: Manifest, damaged: Mapping[str, Sequence[int]] | None = None
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.files = [f for f in manifest.files if damaged is None or f.path in damaged]
        self.targets: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for f in self.files:
            indexes = range(len(f.chunks)) if damaged is None else damaged[f.path]
            for i in indexes:
                self.targets[f.chunks[i]].append((f.path, i * manifest.chunk_size))
        self._fds: dict[str, int] = {}
        self._left = Counter(path for where in self.targets.values() for path, _ in where)
        self._lock = threading.Lock()

    def create_files(self) -> None:
        """Create every directory and every file at its final size (sparse until filled)."""
        for d in self.manifest.dirs:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for f in self.files:
            path = self.root / f.path
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
            written += os.pwritev(self._fd(relpath), bufs, start)
            self._wrote(relpath, len(bufs))
        return written

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

    def close(self) -> None:
        """Close the files opened for writing (idempotent)."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def finish(self) -> None:
        """Close the files and apply file modes once all data is in place."""
        self.close()
        for f in self.files:
            os.chmod(self.root / f.path, f.mode)


# Returns the read's bytes; a view may be reused by the same worker's next read.
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
    """Run the reads in parallel; verify each chunk's hash before it lands in a file."""
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
        placer.place_many(
            [
                (c.hash, decode_chunk(c, data[c.offset - r.start : c.offset - r.start + c.length]))
                for c in r.chunks
            ]
        )
        stats.add(bytes_downloaded=len(data), requests=1, chunks_transferred=len(r.chunks))
        if progress is not None:
            with done_lock:
                done[0] += len(data)
                so_far = done[0]
            progress(so_far, total)

    futures = [executor.submit(run, r) for r in reads]
    try:
        for fut in futures:
            fut.result(timeout=max(deadline.remaining(), 0.001))
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise


def place_local(
    placer: Placer,
    local: LocalChunks | None,
    stats: StatsRecorder,
    *,
    executor: Executor,
    deadline: Deadline,
) -> list[Chunk]:
    """Fill what local copies can, in parallel slices (hashing releases the GIL); return
    the chunks that still have to be downloaded."""
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
        missing = [h for part in executor.map(fill, parts) for h in part]
    finally:
        local.close()
    return [placer.manifest.chunks[h] for h in missing]
