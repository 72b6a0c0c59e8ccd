"""Cutting a source tree into content-addressed chunks, and decoding stored ones.

Chunks are fixed-size and aligned to file offsets, so a changed sqlite page
changes exactly one chunk. New chunks go into packs: :mod:`engine.packing`.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

import zstandard

from chroma_snapshots.engine.beneath import READ_FLAGS
from chroma_snapshots.engine.chunkids import chunk_ok
from chroma_snapshots.engine.deadline import Deadline, wait_all
from chroma_snapshots.engine.models import Chunk
from chroma_snapshots.engine.packing import DEFAULT_PACK_TARGET as DEFAULT_PACK_TARGET
from chroma_snapshots.engine.packing import PackWriter as PackWriter
from chroma_snapshots.engine.stampindex import Stamp, stamp_of
from chroma_snapshots.engine.storeparts import refuse_store_parts
from chroma_snapshots.engine.validation import (
    MAX_CHUNK_SIZE,
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    MAX_PATH_DEPTH,
    check_relpath,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError

DEFAULT_CHUNK_SIZE = 64 << 10


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
