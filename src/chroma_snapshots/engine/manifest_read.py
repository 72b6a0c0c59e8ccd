"""Decoding format 2 manifests (docs/FORMAT.md): hostile bytes to a validated Manifest.

Every count is bounded by the format's limits and by the bytes left before anything is
allocated, every index and offset is range-checked, and the body must be consumed exactly.
The chunk table is read and checked as columns (a column of numbers in one loop, not a
call per number) and the rules ``Manifest.validate`` checks on objects are checked on them:
each file's chunk list names entries of the sizes its size needs, every entry is used or a
link on a used chunk's delta chain, chains end in a keyframe within ``MAX_CHAIN`` deltas.
Then the name, parent and tree of paths by ``Manifest.check_names_and_tree``. Objects are
built last, from the checked columns. Anything wrong is an IntegrityError.
"""

from __future__ import annotations

import sys
from array import array
from itertools import compress
from operator import add, itemgetter, sub
from typing import Any

from chroma_snapshots.engine import validation as val
from chroma_snapshots.engine.builders import build_chunks, build_files
from chroma_snapshots.engine.manifest_codec import (
    CODEC_IDS,
    CODEC_NAMES,
    FORMAT,
    HEADER_KEYS,
    ID_BYTES,
    LAYOUT_BUNDLED,
    MAX_HEADER,
    MAX_WIDTH,
    MIN_ENTRY,
    Reader,
    decompress,
    is_v2,
    read_varint,
    read_varints,
)
from chroma_snapshots.engine.models import FileEntry, Manifest, link_key
from chroma_snapshots.engine.validation import (
    MAX_CHAIN,
    MAX_CHUNK_REFS,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_DIRS,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_METADATA_DEPTH,
    MAX_PACK_SIZE,
    MIN_CHUNK_SIZE,
    parse_time,
)
from chroma_snapshots.errors import IntegrityError

__all__ = ["decode"]


def decode(data: bytes) -> Manifest:
    """A validated Manifest from format 2 bytes (either layout): every field range-checked
    while reading, the chunk table's rules (the ones ``Manifest.validate`` checks on the
    objects) on its columns, then the names and the tree by ``check_names_and_tree``."""
    if not is_v2(data):
        raise IntegrityError("not a format 2 manifest")
    r = Reader(decompress(data))
    head, layout = _header(r)
    cs = head["chunk_size"]
    packs = r.hashes(r.count("packs", MAX_CHUNKS, 32), "pack id")
    width = ID_BYTES[layout]  # bytes of a chunk id
    n = r.count("chunks", MAX_CHUNKS, width + MIN_ENTRY)  # an id, then a byte per column
    links = r.count("chain links", MAX_CHUNKS - n, MIN_ENTRY) if layout else 0
    if (width + MIN_ENTRY) * n + MIN_ENTRY * links > r.left():
        raise IntegrityError(f"manifest lists {n} chunks and {links} links: more than present")
    # Bounds on what was stored, not on what it decompressed to: hashes do not compress,
    # so n of them need width x n bytes of input; every link is on the chain of a hashed
    # chunk, at most MAX_CHAIN each. A tiny body that declares a million entries is
    # refused before anything is built for them.
    if width * n > len(data) or links > MAX_CHAIN * n:
        raise IntegrityError(
            f"manifest of {len(data)} bytes lists {n} chunks and {links} links: "
            "more than such a manifest can hold"
        )
    hashes = r.hashes(n, "chunk hash", width)
    if len(set(hashes)) != n:
        raise IntegrityError("manifest: a chunk appears twice in the table")
    t = _chunk_table(r, hashes, links, packs, cs, layout)
    files = _files(r, t, cs, layout >= LAYOUT_BUNDLED)
    dirs = tuple(r.paths(r.count("dirs", MAX_DIRS, 2), "dir"))
    if r.left():
        raise IntegrityError(f"manifest: {r.left()} bytes after the end")
    chunks = build_chunks(
        t.keys, list(map(packs.__getitem__, t.packs)), t.offsets, t.lengths, t.sizes,
        t.codecs, t.base_keys(),
    )  # fmt: skip
    m = Manifest(**head, files=files, chunks=chunks, dirs=dirs, format_version=FORMAT)
    m.check_names_and_tree()
    return m


def _header(r: Reader) -> tuple[dict[str, Any], int]:
    raw = val.loads_json(
        bytes(r.take(r.count("header bytes", MAX_HEADER, 1), "header")),
        "manifest header",
        MAX_HEADER,
    )
    layout_1 = isinstance(raw, dict) and "layout" in raw
    o = val.as_obj(raw, "manifest header", HEADER_KEYS | ({"layout"} if layout_1 else set()))
    if o["format"] != FORMAT:
        raise IntegrityError(f"manifest header says format {o['format']!r}, not {FORMAT}")
    if layout_1 and (
        type(o["layout"]) is not int or o["layout"] not in ID_BYTES or not o["layout"]
    ):
        raise IntegrityError(f"manifest header says layout {o['layout']!r}, not 1, 2, 3 or 4")
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
    layout: int = o["layout"] if layout_1 else 0
    return head, layout


class _Table:
    """The chunk table as checked columns, entry i in each: its key (hash, or place for a
    link), pack number, offset, stored length, size, codec name and base entry (or None).
    Entries below ``hashed`` are the ones files may name."""

    def __init__(self, hashed: int, keys: list[str], packs: list[int]) -> None:
        self.hashed, self.keys, self.packs = hashed, keys, packs
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self.sizes: list[int] = []
        self.codecs: list[str] = []
        self.bases: list[int | None] = []

    def has_deltas(self) -> bool:
        return self.bases.count(None) != len(self.bases)

    def base_keys(self) -> list[str | None]:
        """Each entry's base by its key (None for a keyframe)."""
        if not self.has_deltas():
            return [None] * len(self.bases)
        return [None if b is None else self.keys[b] for b in self.bases]


def _chunk_table(
    r: Reader, hashes: list[str], links: int, packs: list[str], cs: int, layout: int
) -> _Table:
    """Layout 0: ``hashes`` is the whole table, bases are absolute indexes. Layout 1: then
    ``links`` entries known by place, bases coded against the next link not yet named."""
    n = len(hashes) + links
    pack_nos = r.varints(n, "pack number")
    offset_codes = r.zigzags(n, "offset")
    short = _read_planes(r, n) if layout else r.varints(n, "length")
    sizes = [s or cs for s in r.varints(n, "size")]
    codecs = bytes(r.take(n, "codecs"))
    offsets, lengths = _places(pack_nos, offset_codes, short, sizes, codecs, len(packs), cs)
    keys = hashes + [link_key(packs[pack_nos[i]], offsets[i]) for i in range(len(hashes), n)]
    if len(set(keys)) != n:
        raise IntegrityError("manifest: two chain links are at the same place")
    t = _Table(len(hashes), keys, pack_nos)
    t.offsets, t.lengths, t.sizes = offsets, lengths, sizes
    t.codecs = list(map(CODEC_NAMES.__getitem__, codecs))
    t.bases = _bases(r, codecs, len(hashes), layout)
    return t


def _places(
    pack_nos: list[int],
    offset_codes: list[int],
    short: list[int],
    sizes: list[int],
    codecs: bytes,
    npacks: int,
    cs: int,
) -> tuple[list[int], list[int]]:
    """Each entry's offset and stored length, every one range-checked: a known pack and
    codec, a size of 1 to the chunk size, 1 to ``size`` stored bytes (exactly ``size`` if
    raw) inside the largest pack. An offset is coded against the previous entry's end when
    both are in the same pack. The checks run on whole columns (min and max of each, in C);
    if one fails, ``_refuse_entry`` finds the first entry that breaks a rule."""
    lengths = list(map(sub, sizes, short))  # short >= 0: at most size
    offsets: list[int] = []
    append, prev_pack, end = offsets.append, -1, 0
    for p, code, length in zip(pack_nos, offset_codes, lengths, strict=True):
        end = code + end if p == prev_pack else code
        append(end)
        end += length
        prev_pack = p
    if offsets and not (
        max(pack_nos) < npacks
        and max(codecs) <= CODEC_IDS["zdelta"]
        and max(sizes) <= cs  # sizes are at least 1: 0 codes cs
        and min(lengths) >= 1
        and min(offsets) >= 0
        and max(map(add, offsets, lengths)) <= MAX_PACK_SIZE
        and not any(compress(short, codecs.translate(_RAW)))
    ):
        _refuse_entry(pack_nos, offset_codes, short, sizes, codecs, npacks, cs)
    return offsets, lengths


_RAW = bytes([1] + [0] * 255)  # codec byte -> 1 for raw ("none") entries, else 0


def _refuse_entry(
    pack_nos: list[int],
    offset_codes: list[int],
    short: list[int],
    sizes: list[int],
    codecs: bytes,
    npacks: int,
    cs: int,
) -> None:
    """IntegrityError for the first entry that breaks a rule of ``_places``, entry by entry."""
    prev_pack, end, raw = -1, 0, CODEC_IDS["none"]
    for i, (p, code, x, size, c) in enumerate(
        zip(pack_nos, offset_codes, short, sizes, codecs, strict=True)
    ):
        if p >= npacks or c not in CODEC_NAMES or size > cs:
            raise IntegrityError(f"chunk table entry {i}: bad pack, codec or size")
        length = size - x
        offset = code + end if p == prev_pack else code
        end = offset + length
        if length < 1 or offset < 0 or end > MAX_PACK_SIZE:
            raise IntegrityError(f"chunk table entry {i}: {length} bytes at {offset} impossible")
        if x and c == raw:
            raise IntegrityError(f"chunk table entry {i}: {length} raw bytes stored for {size}")
        prev_pack = p
    raise IntegrityError("chunk table: an entry breaks a rule")  # not reached: they agree


def _bases(r: Reader, codecs: bytes, hashed: int, layout: int) -> list[int | None]:
    """Each entry's base index (None for a keyframe). An index out of range or an entry
    naming itself is refused here; a cycle or an over-deep chain by ``_check_use``."""
    out: list[int | None] = [None] * len(codecs)
    delta = CODEC_IDS["zdelta"]
    if delta not in codecs:
        return out
    deltas = [i for i, c in enumerate(codecs) if c == delta]
    codes = r.zigzags(len(deltas), "delta base") if layout else r.varints(len(deltas), "delta base")
    nxt = hashed
    for i, code in zip(deltas, codes, strict=True):
        if layout:
            b = nxt + code
            nxt += b == nxt
        else:
            b = code
        if not 0 <= b < len(codecs) or b == i:
            raise IntegrityError(f"chunk table entry {i}: delta base {b} is not another entry")
        out[i] = b
    return out


def _files(r: Reader, t: _Table, cs: int, bundled: bool) -> tuple[FileEntry, ...]:
    """The files: paths, then each file's size, mode and chunk references (coded against
    "the entry after the previous reference"), each a hashed entry of the size its place
    in the file needs; then every entry must be used by a file or a link on a used
    chunk's chain (``_check_use``). ``bundled`` (layout 2): a file of one chunk also has
    its start in it, and may be any slice of it; in layouts 0 and 1 it is all of it."""
    n = r.count("files", MAX_FILES, 4)  # path codes, size, mode
    paths = r.paths(n, "path")
    data, pos, keys, chunk_sizes, hashed = r.buf, r.pos, t.keys, t.sizes, t.hashed
    end = len(data)
    sizes: list[int] = []
    modes: list[int] = []
    ats: list[int] = []
    lists: list[tuple[str, ...]] = []
    used: set[int] = set()
    prev, total, stop = -1, 0, 0  # stop: where the last file of one chunk ended in it
    for path in paths:
        at = 0
        if pos + 2 > end:
            raise IntegrityError(f"manifest: {path}: size and mode run past the end")
        size = data[pos]  # one byte for small files: read here, the rest by a call
        if size < 0x80:
            pos += 1
        else:
            size, pos = read_varint(data, pos, "file size")
        mode = data[pos] if pos < end else 0x80  # past the end: read_varint refuses
        if mode < 0x80:
            pos += 1
        elif pos + 1 < end and data[pos + 1] < 0x80:  # 0o644 and the like: 2 bytes
            mode = mode & 0x7F | data[pos + 1] << 7
            pos += 2
        else:
            mode, pos = read_varint(data, pos, "file mode")
        if size > MAX_FILE_SIZE or mode > 0o777:
            raise IntegrityError(f"{path}: size {size} or mode {mode:o} out of range")
        refs = -(-size // cs)
        total += refs
        # A reference takes a byte here (format 1: 67), so the count is bounded on its own.
        if refs > end - pos or total > MAX_CHUNK_REFS:
            raise IntegrityError(f"{path}: {refs} chunks, more than the manifest may hold")
        if refs == 1:  # most files of a tree of small ones
            z = data[pos]
            if z < 0x80:
                pos += 1
            else:
                z, pos = read_varint(data, pos, "chunk reference")
            last = prev
            prev += 1 + ((z >> 1) ^ -(z & 1))
            if not 0 <= prev < hashed:
                raise IntegrityError(f"{path}: chunk reference {prev} out of range")
            if bundled:
                z = data[pos] if pos < end else 0x80  # past the end: read_varint refuses
                if z < 0x80:  # a run of bundled files: each a zero byte
                    pos += 1
                else:
                    z, pos = read_varint(data, pos, "file start")
                at = (stop if prev == last else 0) + ((z >> 1) ^ -(z & 1))
                stop = at + size
                if at < 0 or stop > chunk_sizes[prev]:
                    raise IntegrityError(
                        f"{path}: its {size} bytes at {at} are not inside a chunk of the table"
                    )
            elif chunk_sizes[prev] != size:
                raise IntegrityError(f"{path}: chunk 0 missing from the table or of wrong size")
            used.add(prev)
            lists.append((keys[prev],))
        elif not refs:
            lists.append(())
        else:
            codes, pos = read_varints(data, pos, refs, "chunk reference")
            prev = _references(path, codes, prev, size, t, cs)
            lists.append(tuple([keys[i] for i in codes]))
            used.update(codes)
        sizes.append(size)
        modes.append(mode)
        ats.append(at)
    r.pos = pos
    _check_use(t, used)
    return build_files(paths, sizes, modes, lists, ats)


def _references(path: str, codes: list[int], prev: int, size: int, t: _Table, cs: int) -> int:
    """A file's chunk references (two or more), decoded into ``codes`` in place; the last
    one is returned. Each is a hashed entry of the size its place in the file needs: every chunk
    of a file is a whole chunk but its last, which holds the rest."""
    n = len(codes)
    if not any(codes) and prev + n < t.hashed:  # the usual: each the entry after the last
        codes[:] = range(prev + 1, prev + 1 + n)
        prev += n
    else:
        for k, z in enumerate(codes):
            prev += 1 + ((z >> 1) ^ -(z & 1))
            if not 0 <= prev < t.hashed:
                raise IntegrityError(f"{path}: chunk reference {prev} out of range")
            codes[k] = prev
    got: tuple[int, ...] = itemgetter(*codes)(t.sizes)  # a tuple: n >= 2 here
    if got[-1] != size - cs * (n - 1) or got[:-1].count(cs) != n - 1:
        bad = next(k for k, s in enumerate(got) if s != min(cs, size - cs * k))
        raise IntegrityError(f"{path}: chunk {bad} missing from the table or of wrong size")
    return prev


def _check_use(t: _Table, used: set[int]) -> None:
    """Every entry is a chunk a file uses or a link on a used chunk's delta chain; chains
    end in a keyframe within ``MAX_CHAIN`` deltas (no cycle). Files name hashed entries
    only, so a link is never used directly."""
    if t.has_deltas():
        keys = t.keys
        bases = dict(zip(keys, t.base_keys(), strict=True))
        need = len(val.check_chains(bases, [keys[i] for i in used]))
    else:
        need = len(used)
    if need != len(t.keys):
        raise IntegrityError("chunk table lists chunks no file uses")


def _read_planes(r: Reader, n: int) -> list[int]:
    """A column of ``n`` numbers stored as ``width`` byte planes, low byte first: the
    planes are interleaved into little-endian 16- or 32-bit integers, read as an array."""
    width = r.varint("length width")
    if width > MAX_WIDTH or width * n > r.left():
        raise IntegrityError(f"manifest: lengths {width} bytes wide: more than allowed or present")
    if width <= 1:
        return list(r.take(n, "lengths")) if width else [0] * n
    item = _UINT16 if width == 2 else _UINT32
    buf = bytearray(item.itemsize * n)
    for k in range(width):
        buf[k :: item.itemsize] = r.take(n, "lengths")
    values = array(item.typecode, buf)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


_UINT16, _UINT32 = array("H"), array("I" if array("I").itemsize == 4 else "L")
if _UINT16.itemsize != 2 or _UINT32.itemsize != 4:
    raise ImportError("manifest_read: no 16- and 32-bit array types here")
