"""Cutting a source tree into content-addressed chunks, and decoding stored ones.

Chunks are fixed-size and aligned to file offsets, so a changed sqlite page
changes exactly one chunk. New chunks go into packs: :mod:`engine.packing`.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path

import zstandard

from chroma_snapshots.engine.chunkids import chunk_ok
from chroma_snapshots.engine.deadline import Deadline, wait_all
from chroma_snapshots.engine.models import Chunk
from chroma_snapshots.engine.packing import DEFAULT_PACK_TARGET as DEFAULT_PACK_TARGET
from chroma_snapshots.engine.packing import PackWriter as PackWriter
from chroma_snapshots.engine.source import SourceFile, check_unchanged, open_source
from chroma_snapshots.engine.validation import (
    MAX_CHUNK_SIZE,
)
from chroma_snapshots.errors import IntegrityError

DEFAULT_CHUNK_SIZE = 64 << 10


def read_chunks(
    path: str | Path, chunk_size: int, seen: SourceFile | None = None
) -> Iterator[bytes]:
    """The file's bytes in ``chunk_size`` pieces (the last may be shorter). ``seen``: the
    scan's view of the file, checked once every byte is read (:func:`check_unchanged`)."""
    fd = open_source(path)
    try:
        while block := read_full(fd, chunk_size):
            yield block
        if seen is not None:
            check_unchanged(fd, seen)
    finally:
        os.close(fd)


def read_full(fd: int, n: int) -> bytes:
    """``n`` bytes, or fewer only at the end of the file (a read may return less)."""
    block = os.read(fd, n)
    while 0 < len(block) < n and (more := os.read(fd, n - len(block))):
        block += more
    return block


def _read_small(
    files: Sequence[SourceFile], chunk_size: int, digest: Callable[[bytes], str]
) -> list[list[tuple[bytes, str]]]:
    """Each file's (chunk, hash) pairs: for a batch of small files, on a pool thread (open,
    read and close release the GIL)."""
    return [[(raw, digest(raw)) for raw in read_chunks(f.path, chunk_size, f)] for f in files]


def hashed_chunks(
    files: Sequence[SourceFile],
    chunk_size: int,
    hash_many: Callable[[list[bytes]], list[str]],
    digest: Callable[[bytes], str],
    pool: Executor | None = None,
    deadline: Deadline | None = None,
) -> Iterator[tuple[int, bytes, str]]:
    """(index in ``files``, chunk, hash) for each chunk of each file in order, each
    checked to be unchanged since the scan once read (:func:`check_unchanged`). Small
    files (one chunk) are read and hashed in batches on ``pool``, a few batches ahead;
    larger ones here, ``_HASH_BATCH`` chunks at a time hashed by ``hash_many`` (which may
    spread them over threads: the hashes release the GIL); small ones by ``digest``. One
    hand-off per file cost 100,000 of them for 100,000 files."""
    ahead: deque[tuple[list[int], Future[list[list[tuple[bytes, str]]]]]] = deque()

    def drain(keep: int) -> Iterator[tuple[int, bytes, str]]:
        while len(ahead) > keep:
            owners, job = ahead.popleft()
            got = wait_all([job], deadline, "reading files")[0] if deadline else job.result()
            for i, chunks in zip(owners, got, strict=True):
                yield from ((i, raw, digest) for raw, digest in chunks)

    group: list[int] = []
    group_bytes = 0

    def submit() -> None:
        assert pool is not None
        ahead.append(
            (group, pool.submit(_read_small, [files[j] for j in group], chunk_size, digest))
        )

    for i, f in enumerate(files):
        if pool is not None and f.size <= chunk_size:
            group.append(i)
            group_bytes += f.size
            if len(group) == _SMALL_BATCH or group_bytes >= _SMALL_BYTES:
                submit()
                group, group_bytes = [], 0
                yield from drain(_AHEAD)
            continue
        if group:  # a large file (or no pool): what came before it goes first
            submit()
            group, group_bytes = [], 0
        yield from drain(0)
        yield from _hashed_file(i, f, chunk_size, hash_many)
    if group:
        submit()
    yield from drain(0)


def _hashed_file(
    i: int, f: SourceFile, chunk_size: int, hash_many: Callable[[list[bytes]], list[str]]
) -> Iterator[tuple[int, bytes, str]]:
    pending: list[bytes] = []
    for raw in read_chunks(f.path, chunk_size, f):
        pending.append(raw)
        if len(pending) == _HASH_BATCH:
            yield from ((i, r, d) for r, d in zip(pending, hash_many(pending), strict=True))
            pending = []
    if pending:
        yield from ((i, r, d) for r, d in zip(pending, hash_many(pending), strict=True))


# Chunks of a large file hashed per call of ``hash_many`` (16 MiB at 64 KiB chunks);
# small files read per pool task, and how many such tasks may run ahead of the caller.
_HASH_BATCH = 256
_SMALL_BATCH = 256
_SMALL_BYTES = 4 << 20
_AHEAD = 4


_THREAD = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (one may not be shared between threads): making one per
    chunk was 2% of a cold checkout's CPU time."""
    d: zstandard.ZstdDecompressor | None = getattr(_THREAD, "zstd", None)
    if d is None:
        d = _THREAD.zstd = zstandard.ZstdDecompressor(max_window_size=MAX_CHUNK_SIZE)
    return d


def _unzstd(c: Chunk, stored: bytes | memoryview) -> bytes:
    """Decompress into at most ``c.size`` bytes. The frame header's content size is checked
    first: the decompressor allocates whatever it declares, even past ``max_output_size``."""
    try:
        declared = zstandard.frame_content_size(stored)
        if declared not in (-1, c.size):  # -1: the header does not say
            raise IntegrityError(
                f"chunk {c.hash[:12]}: compressed frame declares {declared} bytes, not {c.size}"
            )
        return _decompressor().decompress(stored, max_output_size=c.size)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"chunk {c.hash[:12]}: corrupt compressed data") from e


def _unzstd_into(c: Chunk, stored: bytes | memoryview, out: memoryview) -> memoryview:
    """Decompress into ``out[:c.size]`` (a reused buffer: a fresh 64 KiB bytes object per
    chunk cost 16 page faults, 5x the CPU time of the decompression itself); more or
    fewer bytes than ``c.size`` is an IntegrityError."""
    try:
        declared = zstandard.frame_content_size(stored)
        if declared not in (-1, c.size):  # -1: the header does not say
            raise IntegrityError(
                f"chunk {c.hash[:12]}: compressed frame declares {declared} bytes, not {c.size}"
            )
        view, got = out[: c.size], 0
        with _decompressor().stream_reader(stored) as reader:
            while got < c.size and (n := reader.readinto(view[got:])):
                got += n
            extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"chunk {c.hash[:12]}: corrupt compressed data") from e
    if got != c.size or extra:
        raise IntegrityError(f"chunk {c.hash[:12]}: decompresses to other than {c.size} bytes")
    return view


def decode_chunk(
    c: Chunk, stored: bytes | memoryview, out: memoryview | None = None
) -> bytes | memoryview:
    """Decompress one stored chunk and verify its hash; IntegrityError on any mismatch.

    An uncompressed chunk comes back as ``stored`` itself (no copy); a compressed one is
    decompressed into ``out`` (at least ``c.size`` bytes) if given, and comes back as a
    view of it. A delta needs its base: see ``delta.decode``."""
    if c.base is not None:
        raise IntegrityError(f"chunk {c.hash[:12]} is a delta: it needs its base to decode")
    if len(stored) != c.length:
        raise IntegrityError(
            f"chunk {c.hash[:12]}: {len(stored)} stored bytes, expected {c.length}"
        )
    raw: bytes | memoryview = stored
    if c.codec == "zstd":
        raw = _unzstd(c, stored) if out is None else _unzstd_into(c, stored, out)
    if len(raw) != c.size or not chunk_ok(raw, c.hash):
        raise IntegrityError(f"chunk {c.hash[:12]} in pack {c.pack[:12]}: hash mismatch")
    return raw
