"""Format 2 manifests: a compact, columnar, zstd-compressed binary encoding.

A v1 manifest is canonical JSON of 219-260 bytes per chunk; this one costs about the
chunk's sha256 (32 bytes, incompressible) plus a byte or two, because everything else is
stored as columns that compress to almost nothing: pack numbers, offsets coded against the
previous chunk's end, sizes coded against the chunk size, file chunk lists as indexes
coded against "the next chunk". The layout is specified in docs/FORMAT.md.

Decoding treats the bytes as hostile: every count is bounded by the format's limits and by
the bytes left before anything is allocated, every index and offset is range-checked, the
body must be consumed exactly, and the result goes through ``Manifest.validate`` (tree
rules, chunk sizes, delta chains: no missing base, no cycle, no chain deeper than
``MAX_CHAIN``). Anything wrong is an IntegrityError.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import zstandard

from chroma_snapshots.engine import validation as val
from chroma_snapshots.engine.models import Chunk, FileEntry, Manifest
from chroma_snapshots.engine.validation import (
    MAX_CHUNK_REFS,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_DIRS,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_METADATA_DEPTH,
    MAX_PACK_SIZE,
    MAX_PATH_BYTES,
    MIN_CHUNK_SIZE,
    canonical_json,
    check_relpath,
    format_time,
    parse_time,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError

MAGIC = b"CSM\x02"
FORMAT = 2
CODEC_IDS = {"none": 0, "zstd": 1, "zdelta": 2}
_CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
_HEADER_KEYS = {
    "format",
    "name",
    "parent",
    "created_at",
    "publisher",
    "message",
    "chunk_size",
    "metadata",
}
_MAX_HEADER = 1 << 24  # name, message and metadata: JSON, bounded like a v1 manifest's
_LEVEL = 9  # manifests are small and written once; read by every reader


def is_v2(data: bytes | memoryview) -> bool:
    """True if ``data`` starts like a format 2 manifest."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def dumps(m: Manifest) -> bytes:
    """The stored bytes of ``m`` in its ``format_version`` (the bytes it was read from,
    if it was read): what a version id hashes and a signature covers."""
    if m.stored is not None:
        return m.stored
    return encode(m) if m.format_version == FORMAT else m.to_json()


def loads(data: bytes) -> Manifest:
    """Parse and fully validate manifest bytes of either format; IntegrityError on
    anything unexpected. The result remembers ``data`` (see :func:`dumps`)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    m = decode(data) if is_v2(data) else Manifest.from_json(data)
    object.__setattr__(m, "stored", bytes(data))  # frozen: set once, at parse time
    return m


def chain_depth(chunks: Mapping[str, Chunk], h: str) -> int:
    """Deltas between chunk ``h`` and its keyframe (the table is validated: it ends)."""
    d, c = 0, chunks[h]
    while c.base is not None:
        d, c = d + 1, chunks[c.base]
    return d


# Encoding.


def _varint(out: bytearray, n: int) -> None:
    if n < 0:  # a manifest that cannot be valid (a length above its size, say)
        raise InvalidInputError(f"format 2 cannot encode {n}: the manifest is invalid")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(n: int) -> int:
    return n * 2 if n >= 0 else -n * 2 - 1


def _front_coded(out: bytearray, paths: list[str]) -> None:
    prev = b""
    for p in paths:
        b = p.encode()
        common = 0
        for x, y in zip(prev, b, strict=False):
            if x != y:
                break
            common += 1
        _varint(out, common)
        _varint(out, len(b) - common)
        out += b[common:]
        prev = b


def table_order(m: Manifest) -> list[str]:
    """Chunks in first-use order through the files, then chain-only entries by hash."""
    order: dict[str, None] = {}
    for f in m.files:
        order.update(dict.fromkeys(f.chunks))
    rest = sorted(set(m.chunks) - set(order))
    return [*order, *rest]


def encode(m: Manifest) -> bytes:
    """The format 2 bytes of ``m`` (deterministic for a given zstandard build)."""
    header = canonical_json(
        {
            "format": FORMAT,
            "name": m.name,
            "parent": m.parent,
            "created_at": format_time(m.created_at),
            "publisher": m.publisher,
            "message": m.message,
            "chunk_size": m.chunk_size,
            "metadata": dict(m.metadata),
        }
    )
    order = table_order(m)
    index = {h: i for i, h in enumerate(order)}
    chunks = [m.chunks[h] for h in order]
    packs = sorted({c.pack for c in chunks})
    pack_no = {p: i for i, p in enumerate(packs)}
    out = bytearray()
    _varint(out, len(header))
    out += header
    _varint(out, len(packs))
    for p in packs:
        out += bytes.fromhex(p)
    _varint(out, len(chunks))
    for c in chunks:
        out += bytes.fromhex(c.hash)
    _chunk_columns(out, chunks, pack_no, index, m.chunk_size)
    _varint(out, len(m.files))
    _front_coded(out, [f.path for f in m.files])
    prev = -1
    for f in m.files:
        _varint(out, f.size)
        _varint(out, f.mode)
        for h in f.chunks:
            i = index[h]
            _varint(out, _zigzag(i - prev - 1))
            prev = i
    _varint(out, len(m.dirs))
    _front_coded(out, list(m.dirs))
    body = zstandard.ZstdCompressor(level=_LEVEL, write_content_size=True).compress(bytes(out))
    return MAGIC + body


def _chunk_columns(
    out: bytearray,
    chunks: list[Chunk],
    pack_no: Mapping[str, int],
    index: Mapping[str, int],
    chunk_size: int,
) -> None:
    for c in chunks:
        _varint(out, pack_no[c.pack])
    prev: Chunk | None = None
    for c in chunks:
        expected = prev.offset + prev.length if prev is not None and prev.pack == c.pack else 0
        _varint(out, _zigzag(c.offset - expected))
        prev = c
    for c in chunks:
        _varint(out, c.size - c.length)
    for c in chunks:
        _varint(out, 0 if c.size == chunk_size else c.size)
    out += bytes(CODEC_IDS[c.codec] for c in chunks)
    for c in chunks:
        if c.base is not None:
            _varint(out, index[c.base])


# Decoding.


class _Reader:
    """Bounded reads from the decompressed body; IntegrityError past its end."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0
        # Front coding lets a 3-byte entry repeat a 4 KiB path: decoded path bytes are
        # bounded as format 1's are (by the manifest size), not by the body's.
        self.path_bytes = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left():
            raise IntegrityError(f"manifest: {what} runs past the end ({n} bytes wanted)")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def varint(self, what: str) -> int:
        n, shift, data = 0, 0, self.data
        while self.pos < len(data) and shift < 63:
            b = data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
        raise IntegrityError(f"manifest: bad or truncated number ({what})")

    def count(self, what: str, most: int, min_bytes_each: int) -> int:
        """A count, bounded by the format and by the bytes it needs (before allocating)."""
        n = self.varint(what)
        if n > most or n * min_bytes_each > self.left():
            raise IntegrityError(f"manifest lists {n} {what}: more than allowed or present")
        return n

    def zigzag(self, what: str) -> int:
        z = self.varint(what)
        return z >> 1 if not z & 1 else -((z + 1) >> 1)

    def paths(self, n: int, what: str) -> Iterator[str]:
        prev = b""
        for _ in range(n):
            common = self.varint(what)
            rest = self.varint(what)
            if common > len(prev) or common + rest > MAX_PATH_BYTES:
                raise IntegrityError(f"manifest: bad {what} encoding")
            raw = prev[:common] + bytes(self.take(rest, what))
            self.path_bytes += len(raw)
            if self.path_bytes > MAX_MANIFEST_BYTES:
                raise IntegrityError(
                    f"manifest: its paths come to more than {MAX_MANIFEST_BYTES} bytes"
                )
            try:
                text = raw.decode()
            except UnicodeDecodeError as e:
                raise IntegrityError(f"manifest: {what} is not UTF-8") from e
            yield check_relpath(text, what)
            prev = raw


def decompress(data: bytes) -> bytes:
    """The body of format 2 bytes; IntegrityError if it is not one bounded zstd frame."""
    frame = memoryview(data)[len(MAGIC) :]
    try:
        declared = zstandard.frame_content_size(frame)
        if declared < 0 or declared > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"manifest body declares {declared} bytes (need 0..limit)")
        body = zstandard.ZstdDecompressor(max_window_size=MAX_CHUNK_SIZE).decompress(
            frame, max_output_size=declared, allow_extra_data=False
        )
    except zstandard.ZstdError as e:
        raise IntegrityError("manifest: corrupt compressed body") from e
    if len(body) != declared:
        raise IntegrityError("manifest: body shorter than declared")
    return body


def decode(data: bytes) -> Manifest:
    """A validated Manifest from format 2 bytes: every field range-checked while reading,
    then the whole through ``Manifest.validate`` (tree, sizes, delta chains)."""
    if not is_v2(data):
        raise IntegrityError("not a format 2 manifest")
    r = _Reader(decompress(data))
    head = _header(r)
    cs = head["chunk_size"]
    packs = [bytes(r.take(32, "pack id")).hex() for _ in range(r.count("packs", MAX_CHUNKS, 32))]
    n = r.count("chunks", MAX_CHUNKS, 32 + 5)  # a hash, then at least a byte per column
    hashes = [bytes(r.take(32, "chunk hash")).hex() for _ in range(n)]
    if len(set(hashes)) != n:
        raise IntegrityError("manifest: a chunk appears twice in the table")
    chunks = _chunk_table(r, hashes, packs, cs)
    files = _files(r, hashes, cs)
    dirs = tuple(r.paths(r.count("dirs", MAX_DIRS, 2), "dir"))
    if r.left():
        raise IntegrityError(f"manifest: {r.left()} bytes after the end")
    m = Manifest(**head, files=files, chunks=chunks, dirs=dirs, format_version=FORMAT)
    m.validate()
    return m


def _header(r: _Reader) -> dict[str, Any]:
    raw = val.loads_json(
        bytes(r.take(r.count("header bytes", _MAX_HEADER, 1), "header")),
        "manifest header",
        _MAX_HEADER,
    )
    o = val.as_obj(raw, "manifest header", _HEADER_KEYS)
    if o["format"] != FORMAT:
        raise IntegrityError(f"manifest header says format {o['format']!r}, not {FORMAT}")
    cs = val.as_int(o["chunk_size"], "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    if cs & (cs - 1):
        raise IntegrityError("chunk_size must be a power of two")
    val.check_depth(o["metadata"], "metadata", MAX_METADATA_DEPTH)
    return {
        "name": val.as_str(o["name"], "name"),
        "created_at": parse_time(o["created_at"], "created_at"),
        "chunk_size": cs,
        "parent": val.as_opt_str(o["parent"], "parent"),
        "publisher": val.as_str(o["publisher"], "publisher"),
        "message": val.as_opt_str(o["message"], "message"),
        "metadata": val.as_obj(o["metadata"], "metadata", None),
    }


def _chunk_table(r: _Reader, hashes: list[str], packs: list[str], cs: int) -> dict[str, Chunk]:
    n = len(hashes)
    pack_nos = [r.varint("pack number") for _ in range(n)]
    offset_codes = [r.zigzag("offset") for _ in range(n)]
    short = [r.varint("length") for _ in range(n)]
    sizes = [r.varint("size") or cs for _ in range(n)]
    codecs = bytes(r.take(n, "codecs"))
    out: dict[str, Chunk] = {}
    prev: tuple[int, int] | None = None  # (pack number, end) of the previous entry
    for i, h in enumerate(hashes):
        p, size, codec = pack_nos[i], sizes[i], _CODEC_NAMES.get(codecs[i])
        if p >= len(packs) or codec is None or not 1 <= size <= cs:
            raise IntegrityError(f"chunk {h[:12]}: bad pack, codec or size")
        length = size - short[i]
        offset = offset_codes[i] + (prev[1] if prev is not None and prev[0] == p else 0)
        if not 1 <= length <= size or offset < 0 or offset + length > MAX_PACK_SIZE:
            raise IntegrityError(f"chunk {h[:12]}: {length} bytes at {offset} impossible")
        if codec == "none" and length != size:
            raise IntegrityError(f"chunk {h[:12]}: {length} raw bytes stored for {size}")
        base = None
        if codec == "zdelta":
            b = r.varint("delta base")
            if b >= n or b == i:
                raise IntegrityError(f"chunk {h[:12]}: delta base {b} is not another entry")
            base = hashes[b]
        out[h] = Chunk(h, packs[p], offset, length, size, codec, base)
        prev = (p, offset + length)
    return out


def _files(r: _Reader, hashes: list[str], cs: int) -> tuple[FileEntry, ...]:
    n = r.count("files", MAX_FILES, 4)  # path codes, size, mode
    paths = list(r.paths(n, "path"))
    out = []
    prev, total = -1, 0
    for path in paths:
        size = r.varint("file size")
        mode = r.varint("file mode")
        if size > MAX_FILE_SIZE or mode > 0o777:
            raise IntegrityError(f"{path}: size {size} or mode {mode:o} out of range")
        refs = -(-size // cs)
        total += refs
        # A reference takes a byte here (format 1: 67), so the count is bounded on its own.
        if refs > r.left() or total > MAX_CHUNK_REFS:
            raise IntegrityError(f"{path}: {refs} chunks, more than the manifest may hold")
        idx = []
        for _ in range(refs):
            prev = prev + 1 + r.zigzag("chunk reference")
            if not 0 <= prev < len(hashes):
                raise IntegrityError(f"{path}: chunk reference {prev} out of range")
            idx.append(hashes[prev])
        out.append(FileEntry(path, size, mode, tuple(idx)))
    return tuple(out)
