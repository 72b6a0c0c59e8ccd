"""Small files bundled into shared chunks (format 2, layout 2).

A chunk per file made 100,000 files of 100 B cost 32 bytes of manifest each (a sha256)
and one zstd attempt each. A publisher now concatenates files of at most
:func:`small_limit` bytes, in path order, into bundle chunks; each such file is the slice
``[at, at + size)`` of its bundle (``FileEntry.at``). A bundle is stored, verified and
deduplicated like any chunk: a reader only ever serves a slice of verified bundle bytes.

Where a bundle ends depends on the member files alone, not on their position: after a
file whose path hash falls below ``size / mean`` (so bundles hold about ``mean`` bytes
whatever the file sizes), or before a file that would not fit. Changing, adding or
removing one small file then changes the one bundle it is (or would be) in, and at most
its neighbour, never every later one.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path

from chroma_snapshots.engine.beneath import open_regular
from chroma_snapshots.engine.chunking import read_full
from chroma_snapshots.engine.deadline import Deadline, wait_all
from chroma_snapshots.engine.models import FileEntry, Manifest, is_slice
from chroma_snapshots.engine.source import SourceFile, SourceFolders, check_unchanged, open_in
from chroma_snapshots.errors import InvalidInputError

# A file of at most chunk_size / 64 bytes (1 KiB at the default 64 KiB) is bundled, and
# bundles hold about that much: a chunk of its own costs a file 32 bytes of manifest (32%
# of a 100-byte file), a zstd call and a write, while a bundle of mean B bytes costs ~33 / B
# of the data in manifest (3% at 1 KiB) and moves about B..2B bytes when one member
# changes. Measured with 20,000 files of 100 B changing 1% of them at random
# (benchmarks/publish_stages.py): means of 16, 4, 2 and 1 KiB uploaded 1.76, 1.10, 0.70 and
# 0.43 MB (format 2 without bundles: 0.66 MB, nearly all of it the manifest) for manifests
# of 0.3%, 0.9%, 1.8% and 3.4% of the data. Larger files keep chunks of their own.
_SMALL_DIVISOR = 64
_MEAN_DIVISOR = 64
_HASH_RANGE = 1 << 64
# Bundles read per pool task (at most 4 MiB at the default chunk size), tasks ahead.
_BUNDLES_PER_TASK = 64
_BUNDLES_AHEAD = 4
# Small files are read on the calling thread while that takes under this per file on
# average (the page cache: about 3 us; a network file system's open, a millisecond or more).
_INLINE_NS_PER_FILE = 100_000


def small_limit(chunk_size: int) -> int:
    """The largest file a publisher bundles at this chunk size."""
    return chunk_size // _SMALL_DIVISOR


def _ends_bundle(path: str, size: int, mean: int) -> bool:
    """Whether a bundle ends after this file: with probability size / mean, by path."""
    h = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
    return h * mean < size * _HASH_RANGE


def cut(files: Sequence[tuple[str, int]], chunk_size: int) -> list[list[int]]:
    """Group the (path, size) of small files (in path order, each 1..small_limit bytes) into
    bundles: lists of indexes into ``files``, none over ``chunk_size`` bytes in all."""
    mean = chunk_size // _MEAN_DIVISOR
    groups: list[list[int]] = []
    group: list[int] = []
    total = 0
    for i, (path, size) in enumerate(files):
        if group and total + size > chunk_size:
            groups.append(group)
            group, total = [], 0
        group.append(i)
        total += size
        if _ends_bundle(path, size, mean):
            groups.append(group)
            group, total = [], 0
    if group:
        groups.append(group)
    return groups


def members(m: Manifest) -> dict[str, list[FileEntry]]:
    """Each bundle chunk of ``m`` and the files that are slices of it, by ``at``."""
    out: dict[str, list[FileEntry]] = defaultdict(list)
    for f in m.files:
        if is_slice(f, m.chunks):
            out[f.chunks[0]].append(f)
    for fs in out.values():
        fs.sort(key=lambda f: f.at)
    return dict(out)


def read_exact(f: SourceFile, folders: SourceFolders) -> bytes:
    """All bytes of the source file ``f``, opened in its folder as held in ``folders``
    (:class:`SourceFolders`), and still as the scan saw it (:func:`check_unchanged`):
    InvalidInputError if it has another size now or was written to (its slice would not be
    what the manifest says). One read of ``size + 1`` bytes sees a file that grew; only a
    short one is read on (a read more to see the end of the file each time was a tenth of
    reading 100,000 of them). Whatever was swapped in for it reads as a change too: a
    folder fails (EISDIR), a FIFO reads short or fails (EAGAIN), and a FIFO's writer can
    only give bytes the folder's writers could have written to the file."""
    size = f.size
    fd = open_in(f.path, folders)
    try:
        data = os.read(fd, size + 1)
        while len(data) < size and (more := os.read(fd, size + 1 - len(data))):
            data += more
        if len(data) == size:
            check_unchanged(fd, f)
    except OSError as e:
        raise InvalidInputError(
            f"{f.path}: changed while it was being published (no longer a regular file: "
            f"{e.strerror})"
        ) from e
    finally:
        os.close(fd)
    if len(data) != size:
        raise InvalidInputError(f"{f.path}: changed while it was being published")
    return data


def read_bundles(
    groups: Sequence[Sequence[SourceFile]], digest: Callable[[bytes], str]
) -> list[tuple[bytes, str]]:
    """The bytes and ``digest`` of each bundle of member files (on a pool thread: the reads
    and the hash release the GIL)."""
    out = []
    folders = SourceFolders()
    try:
        for group in groups:
            raw = b"".join([read_exact(f, folders) for f in group])
            out.append((raw, digest(raw)))
    finally:
        folders.close()
    return out


def read_all(
    groups: Sequence[list[int]],
    files: Sequence[SourceFile],
    digest: Callable[[bytes], str],
    pool: Executor,
    dl: Deadline,
) -> Iterator[tuple[list[int], bytes, str]]:
    """(group, bytes, ``digest``) of each bundle of ``groups`` (positions in ``files``). Read
    here while that is fast (a file in the page cache: 100,000 files took 0.3 s here
    against 1.5 s of pool threads handing the GIL back and forth); once reads are slow on
    average (a network file system, where each open waits on the server), the rest is
    read on the pool."""
    k = read = spent = 0
    while k < len(groups) and spent <= _INLINE_NS_PER_FILE * read:
        dl.check("reading small files")
        batch = groups[k : k + _BUNDLES_PER_TASK]
        k += len(batch)
        t = time.perf_counter_ns()
        got = read_bundles([[files[i] for i in g] for g in batch], digest)
        spent += time.perf_counter_ns() - t
        read += sum(map(len, batch))
        yield from ((g, raw, digest) for g, (raw, digest) in zip(batch, got, strict=True))
    yield from _read_on(pool, groups[k:], files, digest, dl)


def _read_on(
    pool: Executor,
    groups: Sequence[list[int]],
    files: Sequence[SourceFile],
    digest: Callable[[bytes], str],
    dl: Deadline,
) -> Iterator[tuple[list[int], bytes, str]]:
    """As :func:`read_all`, read and hashed on ``pool`` a few batches ahead (a task per
    bundle cost more than the reading)."""
    ahead: deque[tuple[Sequence[list[int]], Future[list[tuple[bytes, str]]]]] = deque()
    for k in range(0, len(groups), _BUNDLES_PER_TASK):
        batch = groups[k : k + _BUNDLES_PER_TASK]
        members = [[files[i] for i in g] for g in batch]
        ahead.append((batch, pool.submit(read_bundles, members, digest)))
        while len(ahead) > _BUNDLES_AHEAD or (ahead and k + _BUNDLES_PER_TASK >= len(groups)):
            batch, job = ahead.popleft()
            got = wait_all([job], dl, "reading small files")[0]
            yield from ((g, raw, digest) for g, (raw, digest) in zip(batch, got, strict=True))


Reader = Callable[[FileEntry], "bytes | None"]  # a member's bytes (one more than its size)


def rebuild(read: Reader, files: Sequence[FileEntry], size: int) -> bytes | None:
    """A bundle's bytes put together from its member files, each read with ``read`` (sorted
    by ``at``), or None if they do not cover it, cannot be read, are not exactly their
    size, or disagree where they overlap: every member is read and compared, so a bundle
    that verifies vouches for each of its files (two folders holding the same files give
    members that cover each other). Not verified: the caller hashes the result before
    using a byte of it."""
    out = bytearray()
    for f in files:
        if f.at > len(out):
            return None  # a gap no member covers
        data = read(f)
        if data is None or len(data) != f.size:
            return None
        overlap = min(len(out), f.at + f.size) - f.at
        if out[f.at : f.at + overlap] != data[:overlap]:
            return None
        out += data[overlap:]
    return bytes(out) if len(out) == size else None


def reader_under(root: Path) -> Reader:
    """Members read by path under ``root``: a link at the file itself is not followed, and
    anything but a regular file (a FIFO would block the read forever) reads as None."""
    return member_reader(lambda rel: open_regular(root / rel))


def member_reader(opener: Callable[[str], int]) -> Reader:
    """Members read from the descriptor ``opener(relpath)`` returns (closed after); one
    that cannot be opened or read reads as None."""

    def read(f: FileEntry) -> bytes | None:
        try:
            fd = opener(f.path)
        except OSError:
            return None
        try:
            return read_full(fd, f.size + 1)  # one more: a file grown past its slice
        except OSError:
            return None
        finally:
            os.close(fd)

    return read
