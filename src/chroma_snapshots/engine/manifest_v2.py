"""Format 2 manifests: a compact, columnar, zstd-compressed binary encoding.

A v1 manifest is canonical JSON of 219-260 bytes per chunk; this one costs about the
chunk's sha256 (32 bytes, incompressible) plus a byte or two, because everything else is
stored as columns that compress to almost nothing: pack numbers, offsets coded against the
previous chunk's end, sizes coded against the chunk size, file chunk lists as indexes
coded against "the next chunk". Layout 1 (written since format 2's first release was
extended; layout 0 stays readable) stores the links of delta chains that no file uses
without their hash: a link is known by where its bytes are, and its decoded bytes are
verified through the hash of the chunk its chain ends in. Layout 2 adds where a bundled
small file starts in its chunk; layout 3 names chunks by the first 28 bytes of their
sha256, 4 bytes a chunk less; layout 4 (what a format 2 publisher writes by default) by
the first 30 bytes of their BLAKE3 (engine.chunkids). The layouts are specified in
docs/FORMAT.md.

Decoding (``manifest_read``) treats the bytes as hostile: every count is bounded by the
format's limits and by the bytes left before anything is allocated, every index and offset
is range-checked, the body must be consumed exactly, and the rules of ``Manifest.validate``
hold (tree rules, chunk sizes, delta chains: no missing base, no cycle, no chain deeper
than ``MAX_CHAIN``). Anything wrong is an IntegrityError.
"""

from __future__ import annotations

import gc
import sys
from array import array
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from itertools import chain

import zstandard

from chroma_snapshots.engine.chunkids import B3_ID, SHORT_ID
from chroma_snapshots.engine.manifest_codec import (
    CODEC_IDS,
    FORMAT,
    LAYOUT,
    LAYOUT_B3,
    LAYOUT_BUNDLED,
    LAYOUT_SHORT,
    MAGIC,
    decompress,
    front_coded,
    is_v2,
    varint,
    varints,
    zigzags,
)
from chroma_snapshots.engine.manifest_read import decode
from chroma_snapshots.engine.models import Chunk, FileEntry, Manifest, is_slice, link_key
from chroma_snapshots.engine.validation import (
    MAX_MANIFEST_BYTES,
    canonical_json,
    format_time,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError

__all__ = [
    "CODEC_IDS",
    "FORMAT",
    "LAYOUT",
    "MAGIC",
    "by_place",
    "chain_depth",
    "collector_paused",
    "decode",
    "decompress",
    "dumps",
    "encode",
    "is_v2",
    "loads",
]

# zstd levels: 19 takes 1.2% off a 1,821-chunk chroma manifest (its length column) in 15 ms,
# but 0.15 s on a body of 16,384 chunks for 0-0.5% (12 ms at 9) and 25 s on 2^20 chunks
# for nothing (the hashes are most of it): 19 up to 128 KiB of body (about 4,000 chunks).
_LEVEL, _SMALL_LEVEL, _SMALL_BODY = 9, 19, 1 << 17


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
    with collector_paused():
        m = decode(data) if is_v2(data) else Manifest.from_json(data)
    object.__setattr__(m, "stored", bytes(data))  # frozen: set once, at parse time
    return m


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a manifest (or a publish's list of files) is
    built: it makes a few objects per chunk and file and no cycle, and every 700 of them
    the collector ran, walking all the objects of the process now and then (a third of
    decoding 100,000 files, 0.6 s of publishing them). Nested or concurrent uses leave it
    on if it was on (the first to pause it turns it back on)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


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
    used = dict.fromkeys(chain.from_iterable(f.chunks for f in m.files))
    order, seen, table = list(used), set(used), m.chunks
    for key in order:  # grows while it runs: links of links
        base = table[key].base
        if base is not None and base not in seen:
            seen.add(base)
            order.append(base)
    order += sorted(set(table) - seen)  # none in a valid manifest: readers refuse them
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
    """The format 2 bytes of ``m`` (deterministic for a given zstandard build): layout 4 if
    its chunk ids are BLAKE3 ones, 3 if they are short sha256 ones (engine.chunkids),
    else layout 2 if a file is a slice of a bundle (engine.bundles), else layout 1."""
    hashed, links = table_order(m)
    widths = {len(h) for h in hashed}
    if len(widths) > 1 or not widths <= {SHORT_ID, B3_ID, 64}:
        raise InvalidInputError("a manifest's chunk ids must all be of one hash and length")
    if widths == {B3_ID}:
        layout = LAYOUT_B3
    elif widths == {SHORT_ID}:
        layout = LAYOUT_SHORT
    elif any(is_slice(f, m.chunks) for f in m.files):
        layout = LAYOUT_BUNDLED
    else:
        layout = LAYOUT
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
    order = hashed + links
    index = dict(zip(order, range(len(order)), strict=True))
    chunks = [m.chunks[h] for h in order]
    packs = sorted({c.pack for c in chunks})
    out = bytearray()
    varint(out, len(header))
    out += header
    varint(out, len(packs))
    out += bytes.fromhex("".join(packs))
    varint(out, len(hashed))
    varint(out, len(links))
    out += bytes.fromhex("".join(hashed))
    _chunk_columns(out, chunks, dict(zip(packs, range(len(packs)), strict=True)), m.chunk_size)
    bases, nxt = [], len(hashed)  # the next link a base may name for the first time
    for c in chunks:
        if c.base is not None:
            b = index[c.base]
            bases.append(b - nxt)
            nxt += b == nxt
    varints(out, zigzags(bases))
    varint(out, len(m.files))
    front_coded(out, [f.path for f in m.files])
    varints(out, _file_numbers(m.files, index, layout >= LAYOUT_BUNDLED))
    varint(out, len(m.dirs))
    front_coded(out, list(m.dirs))
    level = _SMALL_LEVEL if len(out) <= _SMALL_BODY else _LEVEL
    body = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(bytes(out))
    return MAGIC + body


def _file_numbers(
    files: tuple[FileEntry, ...], index: Mapping[str, int], bundled: bool
) -> list[int]:
    """Each file's size, mode and chunk references (zigzag, against "the entry after the
    previous reference"): after the paths, the files section is these numbers alone.
    ``bundled`` (layout 2): a file of one chunk also has its start in it (zigzag, against
    where the previous file of one chunk ended when they share the chunk: bundled files
    follow each other, so that costs a zero byte)."""
    out: list[int] = []
    append, prev, end = out.append, -1, 0
    for f in files:
        append(f.size)
        append(f.mode)
        for h in f.chunks:
            i = index[h]
            d = i - prev - 1
            append(d * 2 if d >= 0 else -d * 2 - 1)
            if bundled and len(f.chunks) == 1:
                d = f.at - (end if i == prev else 0)
                append(d * 2 if d >= 0 else -d * 2 - 1)
                end = f.at + f.size
            prev = i
    return out


def _chunk_columns(
    out: bytearray, chunks: list[Chunk], pack_no: Mapping[str, int], chunk_size: int
) -> None:
    numbers = [pack_no[c.pack] for c in chunks]
    varints(out, numbers)
    offsets: list[int] = []
    prev, end = -1, 0
    for p, c in zip(numbers, chunks, strict=True):
        offsets.append(c.offset - end if p == prev else c.offset)
        prev, end = p, c.offset + c.length
    varints(out, zigzags(offsets))
    _planes(out, [c.size - c.length for c in chunks])
    varints(out, [0 if c.size == chunk_size else c.size for c in chunks])
    out += bytes([CODEC_IDS[c.codec] for c in chunks])


def _planes(out: bytearray, values: list[int]) -> None:
    """uv width, then each byte of the values as a column, low byte first: a stored length
    is about as random as its low byte, and zstd codes a column of high bytes in almost
    nothing (0.7 bytes a chunk less than varints on a chroma manifest)."""
    if any(v < 0 for v in values):
        raise InvalidInputError("format 2 cannot encode a length above its size")
    width = (max(values, default=0).bit_length() + 7) // 8
    varint(out, width)
    if width <= 1:
        out += bytes(values) if width else b""
        return
    wide = array("H" if width == 2 else "I" if array("I").itemsize == 4 else "L", values)
    if sys.byteorder == "big":
        wide.byteswap()
    raw = wide.tobytes()  # little-endian: byte k of each value every itemsize bytes
    for k in range(width):
        out += raw[k :: wide.itemsize]


def readable_manifest(name: str, data: bytes) -> None:
    """Decode ``data`` as every reader will, with their whole validation: a publish never
    makes visible a manifest that readers refuse (InvalidInputError, nothing written)."""
    try:
        loads(data)
    except IntegrityError as e:
        raise InvalidInputError(f"{name}: readers would refuse this manifest: {e}") from e
