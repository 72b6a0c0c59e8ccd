"""Format 2 manifests: a compact, columnar, zstd-compressed binary encoding.

A v1 manifest is canonical JSON of 219-260 bytes per chunk; this one costs about the
chunk's sha256 (32 bytes, incompressible) plus a byte or two, because everything else is
stored as columns that compress to almost nothing: pack numbers, offsets coded against the
previous chunk's end, sizes coded against the chunk size, file chunk lists as indexes
coded against "the next chunk". Layout 1 (written since format 2's first release was
extended; layout 0 stays readable) stores the links of delta chains that no file uses
without their hash: a link is known by where its bytes are, and its decoded bytes are
verified through the hash of the chunk its chain ends in. The layout is specified in
docs/FORMAT.md.

Decoding treats the bytes as hostile (``manifest_codec``): every count is bounded by the
format's limits and by the bytes left before anything is allocated, every index and offset
is range-checked, the body must be consumed exactly, and the result goes through
``Manifest.validate`` (tree rules, chunk sizes, delta chains: no missing base, no cycle, no
chain deeper than ``MAX_CHAIN``). Anything wrong is an IntegrityError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import zstandard

from chroma_snapshots.engine import validation as val
from chroma_snapshots.engine.manifest_codec import (
    MAGIC,
    Reader,
    decompress,
    front_coded,
    varint,
    zigzag,
)
from chroma_snapshots.engine.models import (
    Chunk,
    FileEntry,
    Manifest,
    check_no_slices,
    is_slice,
    link_key,
)
from chroma_snapshots.engine.validation import (
    MAX_CHAIN,
    MAX_CHUNK_REFS,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_DIRS,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_METADATA_DEPTH,
    MAX_PACK_SIZE,
    MIN_CHUNK_SIZE,
    canonical_json,
    format_time,
    parse_time,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError

__all__ = [
    "MAGIC",
    "by_place",
    "chain_depth",
    "decode",
    "decompress",
    "dumps",
    "encode",
    "is_v2",
    "loads",
]

FORMAT = 2
# Layout 1 stores chain links no file uses without their hash (header "layout": 1);
# layout 0 (no "layout" field) listed every entry with its hash and stays readable.
# Layout 2 is layout 1 plus where each file of one chunk starts in it (bundled small
# files, engine.bundles); it is written only for manifests that have such files.
LAYOUT = 1
LAYOUT_BUNDLED = 2
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
# zstd levels: 19 takes 1.2% off a 1,821-chunk chroma manifest (its length column) in 15 ms,
# but 25 s on a body of 2^20 chunks for nothing (the hashes are most of it): 19 up to 1 MiB.
_LEVEL, _SMALL_LEVEL, _SMALL_BODY = 9, 19, 1 << 20
_MIN_ENTRY = 4  # bytes an entry takes at least: pack, offset, size, codec (+ its length)
_MAX_WIDTH = 4  # bytes of size - length: below the chunk size, at most 2^26


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


def table_order(m: Manifest) -> tuple[list[str], list[str]]:
    """The table's two parts: the chunks files use, in first-use order through the files
    (stored with their hash), then the chain links no file uses (stored by place), in the
    order deltas first name them, so a base reference is mostly "the next link"."""
    used: dict[str, None] = {}
    for f in m.files:
        used.update(dict.fromkeys(f.chunks))
    order, seen = list(used), set(used)
    for key in order:  # grows while it runs: links of links
        base = m.chunks[key].base
        if base is not None and base not in seen:
            seen.add(base)
            order.append(base)
    order += sorted(set(m.chunks) - seen)  # none in a valid manifest: readers refuse them
    return order[: len(used)], order[len(used) :]


def by_place(m: Manifest) -> Manifest:
    """``m`` as a reader of its layout 1 bytes sees it: the chain links no file uses are
    keyed by place (``link_key``), not by hash."""
    hashed, links = table_order(m)
    key = {h: h for h in hashed} | {
        h: link_key(m.chunks[h].pack, m.chunks[h].offset) for h in links
    }
    chunks = {
        key[h]: replace(c, hash=key[h], base=None if c.base is None else key[c.base])
        for h, c in m.chunks.items()
    }
    return replace(m, chunks=chunks)


def encode(m: Manifest) -> bytes:
    """The format 2 bytes of ``m`` (deterministic for a given zstandard build): layout 2 if
    a file is a slice of a bundle, else layout 1."""
    layout = LAYOUT_BUNDLED if any(is_slice(f, m.chunks) for f in m.files) else LAYOUT
    header = canonical_json(
        {
            "format": FORMAT,
            "layout": layout,
            "name": m.name,
            "parent": m.parent,
            "created_at": format_time(m.created_at),
            "publisher": m.publisher,
            "message": m.message,
            "chunk_size": m.chunk_size,
            "metadata": dict(m.metadata),
        }
    )
    hashed, links = table_order(m)
    order = hashed + links
    index = {h: i for i, h in enumerate(order)}
    chunks = [m.chunks[h] for h in order]
    packs = sorted({c.pack for c in chunks})
    out = bytearray()
    varint(out, len(header))
    out += header
    varint(out, len(packs))
    for p in packs:
        out += bytes.fromhex(p)
    varint(out, len(hashed))
    varint(out, len(links))
    for h in hashed:
        out += bytes.fromhex(h)
    _chunk_columns(out, chunks, {p: i for i, p in enumerate(packs)}, m.chunk_size)
    nxt = len(hashed)  # the next link a base may name for the first time
    for c in chunks:
        if c.base is not None:
            b = index[c.base]
            varint(out, zigzag(b - nxt))
            nxt += b == nxt
    varint(out, len(m.files))
    front_coded(out, [f.path for f in m.files])
    prev, end = -1, 0  # end: where the previous file of one chunk ended in it
    for f in m.files:
        varint(out, f.size)
        varint(out, f.mode)
        for h in f.chunks:
            i = index[h]
            varint(out, zigzag(i - prev - 1))
            if layout == LAYOUT_BUNDLED and len(f.chunks) == 1:
                # bundled files follow each other: "where the last one ended" costs a 0
                varint(out, zigzag(f.at - (end if i == prev else 0)))
                end = f.at + f.size
            prev = i
    varint(out, len(m.dirs))
    front_coded(out, list(m.dirs))
    level = _SMALL_LEVEL if len(out) <= _SMALL_BODY else _LEVEL
    body = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(bytes(out))
    return MAGIC + body


def _chunk_columns(
    out: bytearray, chunks: list[Chunk], pack_no: Mapping[str, int], chunk_size: int
) -> None:
    for c in chunks:
        varint(out, pack_no[c.pack])
    prev: Chunk | None = None
    for c in chunks:
        expected = prev.offset + prev.length if prev is not None and prev.pack == c.pack else 0
        varint(out, zigzag(c.offset - expected))
        prev = c
    _planes(out, [c.size - c.length for c in chunks])
    for c in chunks:
        varint(out, 0 if c.size == chunk_size else c.size)
    out += bytes(CODEC_IDS[c.codec] for c in chunks)


def _planes(out: bytearray, values: list[int]) -> None:
    """uv width, then each byte of the values as a column, low byte first: a stored length
    is about as random as its low byte, and zstd codes a column of high bytes in almost
    nothing (0.7 bytes a chunk less than varints on a chroma manifest)."""
    if any(v < 0 for v in values):
        raise InvalidInputError("format 2 cannot encode a length above its size")
    width = (max(values, default=0).bit_length() + 7) // 8
    varint(out, width)
    for k in range(width):
        out += bytes((v >> (8 * k)) & 0xFF for v in values)


def _read_planes(r: Reader, n: int) -> list[int]:
    width = r.varint("length width")
    if width > _MAX_WIDTH or width * n > r.left():
        raise IntegrityError(f"manifest: lengths {width} bytes wide: more than allowed or present")
    values = [0] * n
    for k in range(width):
        plane = r.take(n, "lengths")
        values = [v | (b << (8 * k)) for v, b in zip(values, plane, strict=True)]
    return values


# Decoding.


def decode(data: bytes) -> Manifest:
    """A validated Manifest from format 2 bytes (either layout): every field range-checked
    while reading, then the whole through ``Manifest.validate`` (tree, sizes, chains)."""
    if not is_v2(data):
        raise IntegrityError("not a format 2 manifest")
    r = Reader(decompress(data))
    head, layout = _header(r)
    cs = head["chunk_size"]
    packs = [bytes(r.take(32, "pack id")).hex() for _ in range(r.count("packs", MAX_CHUNKS, 32))]
    n = r.count("chunks", MAX_CHUNKS, 32 + _MIN_ENTRY)  # a hash, then a byte per column
    links = r.count("chain links", MAX_CHUNKS - n, _MIN_ENTRY) if layout else 0
    if (32 + _MIN_ENTRY) * n + _MIN_ENTRY * links > r.left():
        raise IntegrityError(f"manifest lists {n} chunks and {links} links: more than present")
    # Bounds on what was stored, not on what it decompressed to: sha256 hashes do not
    # compress, so n of them need 32 n bytes of input; every link is on the chain of a
    # hashed chunk, at most MAX_CHAIN each. A tiny body that declares a million entries
    # is refused before anything is built for them.
    if 32 * n > len(data) or links > MAX_CHAIN * n:
        raise IntegrityError(
            f"manifest of {len(data)} bytes lists {n} chunks and {links} links: "
            "more than such a manifest can hold"
        )
    hashes = [bytes(r.take(32, "chunk hash")).hex() for _ in range(n)]
    if len(set(hashes)) != n:
        raise IntegrityError("manifest: a chunk appears twice in the table")
    chunks = _chunk_table(r, hashes, links, packs, cs, layout)
    files = _files(r, hashes, cs, layout == LAYOUT_BUNDLED)
    dirs = tuple(r.paths(r.count("dirs", MAX_DIRS, 2), "dir"))
    if r.left():
        raise IntegrityError(f"manifest: {r.left()} bytes after the end")
    m = Manifest(**head, files=files, chunks=chunks, dirs=dirs, format_version=FORMAT)
    m.validate()
    if layout != LAYOUT_BUNDLED:
        check_no_slices(m, f"a layout {layout} manifest")
    return m


def _header(r: Reader) -> tuple[dict[str, Any], int]:
    raw = val.loads_json(
        bytes(r.take(r.count("header bytes", _MAX_HEADER, 1), "header")),
        "manifest header",
        _MAX_HEADER,
    )
    layout_1 = isinstance(raw, dict) and "layout" in raw
    o = val.as_obj(raw, "manifest header", _HEADER_KEYS | ({"layout"} if layout_1 else set()))
    if o["format"] != FORMAT:
        raise IntegrityError(f"manifest header says format {o['format']!r}, not {FORMAT}")
    if layout_1 and (type(o["layout"]) is not int or o["layout"] not in (LAYOUT, LAYOUT_BUNDLED)):
        raise IntegrityError(f"manifest header says layout {o['layout']!r}, not 1 or 2")
    cs = val.as_int(o["chunk_size"], "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    if cs & (cs - 1):
        raise IntegrityError("chunk_size must be a power of two")
    val.check_depth(o["metadata"], "metadata", MAX_METADATA_DEPTH)
    head = {
        "name": val.as_str(o["name"], "name"),
        "created_at": parse_time(o["created_at"], "created_at"),
        "chunk_size": cs,
        "parent": val.as_opt_str(o["parent"], "parent"),
        "publisher": val.as_str(o["publisher"], "publisher"),
        "message": val.as_opt_str(o["message"], "message"),
        "metadata": val.as_obj(o["metadata"], "metadata", None),
    }
    return head, o["layout"] if layout_1 else 0


def _chunk_table(
    r: Reader, hashes: list[str], links: int, packs: list[str], cs: int, layout: int
) -> dict[str, Chunk]:
    """Layout 0: ``hashes`` is the whole table, bases are absolute indexes. Layout 1: then
    ``links`` entries known by place, bases coded against the next link not yet named."""
    n = len(hashes) + links
    pack_nos = [r.varint("pack number") for _ in range(n)]
    offset_codes = [r.zigzag("offset") for _ in range(n)]
    short = _read_planes(r, n) if layout else [r.varint("length") for _ in range(n)]
    sizes = [r.varint("size") or cs for _ in range(n)]
    codecs = bytes(r.take(n, "codecs"))
    rows: list[tuple[str, str, int, int, int, str]] = []
    prev: tuple[int, int] | None = None  # (pack number, end) of the previous entry
    for i in range(n):
        p, size, codec = pack_nos[i], sizes[i], _CODEC_NAMES.get(codecs[i])
        if p >= len(packs) or codec is None or not 1 <= size <= cs:
            raise IntegrityError(f"chunk table entry {i}: bad pack, codec or size")
        length = size - short[i]
        offset = offset_codes[i] + (prev[1] if prev is not None and prev[0] == p else 0)
        if not 1 <= length <= size or offset < 0 or offset + length > MAX_PACK_SIZE:
            raise IntegrityError(f"chunk table entry {i}: {length} bytes at {offset} impossible")
        if codec == "none" and length != size:
            raise IntegrityError(f"chunk table entry {i}: {length} raw bytes stored for {size}")
        key = hashes[i] if i < len(hashes) else link_key(packs[p], offset)
        rows.append((key, packs[p], offset, length, size, codec))
        prev = (p, offset + length)
    bases = _bases(r, [row[5] for row in rows], len(hashes), layout)
    out = {
        row[0]: Chunk(*row, None if b is None else rows[b][0])
        for row, b in zip(rows, bases, strict=True)
    }
    if len(out) != n:
        raise IntegrityError("manifest: two chain links are at the same place")
    return out


def _bases(r: Reader, codecs: list[str], hashed: int, layout: int) -> list[int | None]:
    """Each entry's base index (None for a keyframe). An index out of range or an entry
    naming itself is refused here; a cycle or an over-deep chain by validation."""
    nxt, out = hashed, list[int | None]()
    for i, codec in enumerate(codecs):
        if codec != "zdelta":
            out.append(None)
            continue
        if layout:
            b = nxt + r.zigzag("delta base")
            nxt += b == nxt
        else:
            b = r.varint("delta base")
        if not 0 <= b < len(codecs) or b == i:
            raise IntegrityError(f"chunk table entry {i}: delta base {b} is not another entry")
        out.append(b)
    return out


def _files(r: Reader, hashes: list[str], cs: int, bundled: bool) -> tuple[FileEntry, ...]:
    n = r.count("files", MAX_FILES, 4)  # path codes, size, mode
    paths = list(r.paths(n, "path"))
    out = []
    prev, total, end = -1, 0, 0
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
        idx, last, at = [], prev, 0
        for _ in range(refs):
            prev = prev + 1 + r.zigzag("chunk reference")
            if not 0 <= prev < len(hashes):
                raise IntegrityError(f"{path}: chunk reference {prev} out of range")
            idx.append(hashes[prev])
        if bundled and refs == 1:
            # validation refuses a slice before or past its chunk
            at = (end if prev == last else 0) + r.zigzag("file offset")
            end = at + size
        out.append(FileEntry(path, size, mode, tuple(idx), at))
    return tuple(out)
