"""Cutting a source tree into content-addressed chunks and packing new chunks.

Chunks are fixed-size and aligned to file offsets, so a changed sqlite page
changes exactly one chunk. New chunks are (optionally) zstd-compressed and
appended to packs of about ``pack_target`` bytes; a pack is named by the
sha256 of its bytes, so a pack key can never hold two different contents.
"""

from __future__ import annotations

import os
import stat
import threading
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from chroma_snapshots.engine import delta
from chroma_snapshots.engine.models import Chunk
from chroma_snapshots.engine.validation import (
    MAX_CHUNK_SIZE,
    MAX_PATH_DEPTH,
    check_relpath,
    sha256_hex,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError

DEFAULT_CHUNK_SIZE = 64 << 10
DEFAULT_PACK_TARGET = 16 << 20
# Storing compressed only pays when it saves something real: float vectors barely compress.
_MIN_SAVING = 0.97


@dataclass(frozen=True)
class SourceFile:
    """A regular file found in a source tree."""

    relpath: str
    abspath: Path
    size: int
    mode: int


def scan_source(root: str | Path) -> tuple[list[SourceFile], list[str]]:
    """Regular files (sorted by path) and empty directories below ``root``.

    Symlinks, devices, sockets, names that could not round-trip safely and trees deeper
    than ``MAX_PATH_DEPTH`` are refused with InvalidInputError: a snapshot must mean the
    same bytes everywhere. The walk keeps its own stack (no recursion), so any depth of
    tree ends in that error, found before anything below the limit is read.
    """
    top = Path(root)
    if not top.is_dir():
        raise InvalidInputError(f"source {str(top)!r} is not a directory")
    files: list[SourceFile] = []
    empty: list[str] = []
    todo: list[tuple[Path, str, int]] = [(top, "", 0)]  # (directory, its relpath, its depth)
    while todo:
        here, rel_dir, depth = todo.pop()
        entries = _list_dir(here)
        if not entries and rel_dir:
            empty.append(_relpath(rel_dir))
        for entry in entries:
            path = here / entry.name
            if depth >= MAX_PATH_DEPTH:
                raise InvalidInputError(
                    f"{path}: more than {MAX_PATH_DEPTH} levels below the source directory"
                )
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = _lstat(entry)
            if stat.S_ISLNK(st.st_mode):
                raise InvalidInputError(f"{path}: symlinks are not supported in snapshots")
            if stat.S_ISDIR(st.st_mode):
                todo.append((path, rel, depth + 1))
            elif stat.S_ISREG(st.st_mode):
                files.append(SourceFile(_relpath(rel), path, st.st_size, st.st_mode & 0o777))
            else:
                raise InvalidInputError(f"{path}: not a regular file")
    files.sort(key=lambda f: f.relpath)
    return files, sorted(empty)


def _list_dir(here: Path) -> list[os.DirEntry[str]]:
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


def read_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    """The file's bytes in ``chunk_size`` pieces (the last may be shorter)."""
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            yield block


def hashed_chunks(
    path: Path, chunk_size: int, hash_many: Callable[[list[bytes]], list[str]], batch: int = 256
) -> Iterator[tuple[bytes, str]]:
    """(chunk, sha256 hex) for each chunk of the file, hashed ``batch`` chunks at a time by
    ``hash_many`` (which may spread them over threads: hashlib releases the GIL)."""
    pending: list[bytes] = []
    for raw in read_chunks(path, chunk_size):
        pending.append(raw)
        if len(pending) == batch:
            yield from zip(pending, hash_many(pending), strict=True)
            pending = []
    if pending:
        yield from zip(pending, hash_many(pending), strict=True)


class PackWriter:
    """Appends new chunks to packs and hands each full pack to ``upload(pack_id, data)``.

    A chunk's location is known only once its pack is sealed (the pack id is
    the hash of its bytes), so locations are collected in :attr:`chunks`.
    """

    def __init__(
        self,
        upload: Callable[[str, bytes], None],
        *,
        target: int = DEFAULT_PACK_TARGET,
        level: int | None = 3,
    ) -> None:
        self._upload = upload
        self._target = target
        self._compressor = zstandard.ZstdCompressor(level=level) if level is not None else None
        self._buf = bytearray()
        self._pending: list[tuple[str, int, int, int, str, str | None]] = []
        self.chunks: dict[str, Chunk] = {}
        self.packs: list[str] = []
        self._added: set[str] = set()

    def __contains__(self, digest: str) -> bool:
        return digest in self._added

    def add(self, digest: str, raw: bytes, base: tuple[str, bytes] | None = None) -> None:
        """Store one new chunk (the caller has checked it is not already stored).

        With ``base`` (hash, bytes: the parent's chunk at the same file offset) and
        compression on, the chunk is stored as a delta against it when that takes less
        than half of what the chunk alone would."""
        self._added.add(digest)
        data, codec, base_hash = raw, "none", None
        if self._compressor is not None:
            packed = self._compressor.compress(raw)
            if len(packed) < len(raw) * _MIN_SAVING:
                data, codec = packed, "zstd"
            if base is not None and base[0] != digest:
                patch = delta.encode(raw, base[1], delta.LEVEL)
                if len(patch) * 2 < len(data):
                    data, codec, base_hash = patch, delta.CODEC, base[0]
        self._pending.append((digest, len(self._buf), len(data), len(raw), codec, base_hash))
        self._buf += data
        if len(self._buf) >= self._target:
            self.flush()

    def flush(self) -> None:
        """Seal the current pack (if any) and upload it."""
        if not self._pending:
            return
        data = bytes(self._buf)
        pack_id = sha256_hex(data)
        for digest, offset, length, size, codec, base in self._pending:
            self.chunks[digest] = Chunk(digest, pack_id, offset, length, size, codec, base)
        self._pending.clear()
        self._buf = bytearray()
        self.packs.append(pack_id)
        self._upload(pack_id, data)


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
    if len(raw) != c.size or sha256_hex(raw) != c.hash:
        raise IntegrityError(f"chunk {c.hash[:12]} in pack {c.pack[:12]}: hash mismatch")
    return raw
