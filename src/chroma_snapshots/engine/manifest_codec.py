"""The byte-level pieces of format 2 manifests: varints, zigzag numbers, front-coded paths,
bounded reads of a hostile body, and the one zstd frame around it (docs/FORMAT.md).

Reading treats every byte as hostile: a number ends within 9 bytes, a count is bounded by
the format and by the bytes left before anything is allocated, decoded paths are bounded
in all, and the frame must declare its size and hold nothing after it. Anything wrong is
an IntegrityError.
"""

from __future__ import annotations

import zstandard

from chroma_snapshots.engine.validation import (
    MAX_CHUNK_SIZE,
    MAX_MANIFEST_BYTES,
    MAX_PATH_BYTES,
    check_relpaths,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError

MAGIC = b"CSM\x02"
FORMAT = 2
# Layout 1 stores chain links no file uses without their hash (header "layout": 1);
# layout 0 (no "layout" field) listed every entry with its hash and stays readable.
LAYOUT = 1
# Layout 2 is layout 1 plus where each file of one chunk starts in it (bundled small
# files, engine.bundles); it is written only for manifests that have such files.
LAYOUT_BUNDLED = 2
# Layout 3 is layout 2 with chunk ids of 28 bytes (sha256 truncated to 224 bits,
# engine.chunkids), written for manifests whose ids are short sha256 ones.
LAYOUT_SHORT = 3
# Layout 4 is layout 2 with chunk ids of 30 bytes (BLAKE3 truncated to 240 bits,
# engine.chunkids): what a format 2 publisher makes by default since this layout. Pack
# ids keep their 32 bytes of sha256 in every layout.
LAYOUT_B3 = 4
ID_BYTES = {0: 32, LAYOUT: 32, LAYOUT_BUNDLED: 32, LAYOUT_SHORT: 28, LAYOUT_B3: 30}
CODEC_IDS = {"none": 0, "zstd": 1, "zdelta": 2}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
HEADER_KEYS = {
    "format",
    "name",
    "parent",
    "created_at",
    "publisher",
    "message",
    "chunk_size",
    "metadata",
}
MAX_HEADER = 1 << 24  # name, message and metadata: JSON, bounded like a v1 manifest's
MIN_ENTRY = 4  # bytes an entry takes at least: pack, offset, size, codec (+ its length)
MAX_WIDTH = 4  # bytes of size - length: below the chunk size, at most 2^26


def is_v2(data: bytes | memoryview) -> bool:
    """True if ``data`` starts like a format 2 manifest."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def varint(out: bytearray, n: int) -> None:
    """Append ``n`` as an unsigned LEB128 varint."""
    if n < 0:  # a manifest that cannot be valid (a length above its size, say)
        raise InvalidInputError(f"format 2 cannot encode {n}: the manifest is invalid")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def zigzag(n: int) -> int:
    """A signed number as an unsigned one, small either side of zero."""
    return n * 2 if n >= 0 else -n * 2 - 1


def varints(out: bytearray, values: list[int]) -> None:
    """Append each of ``values`` as a varint: one ``bytes`` call when all are below 128."""
    if not values:
        return
    if min(values) >= 0 and max(values) < 0x80:
        out += bytes(values)
        return
    append = out.append
    for n in values:
        if n < 0:
            raise InvalidInputError(f"format 2 cannot encode {n}: the manifest is invalid")
        while n >= 0x80:
            append((n & 0x7F) | 0x80)
            n >>= 7
        append(n)


def zigzags(values: list[int]) -> list[int]:
    """:func:`zigzag` of each of ``values``."""
    return [n * 2 if n >= 0 else -n * 2 - 1 for n in values]


def front_coded(out: bytearray, paths: list[str]) -> None:
    """Append each path as (bytes shared with the previous one, the rest). The shared bytes
    are counted by one XOR of the two prefixes as integers: its leading zero bytes."""
    prev = b""
    for p in paths:
        b = p.encode()
        n = min(len(prev), len(b))
        x = int.from_bytes(prev[:n], "big") ^ int.from_bytes(b[:n], "big")
        common = n - (x.bit_length() + 7) // 8
        rest = len(b) - common
        if common < 0x80 and rest < 0x80:
            out.append(common)
            out.append(rest)
        else:
            varint(out, common)
            varint(out, rest)
        out += b[common:]
        prev = b


def read_varints(data: bytes, pos: int, n: int, what: str) -> tuple[list[int], int]:
    """``n`` varints of ``data`` from ``pos`` and the position after them: one loop over
    the bytes, not a call per number, and one C call when every value is a single byte
    (most columns: pack numbers, offset codes, chunk references). Each number ends within
    9 bytes, as :meth:`Reader.varint` reads it."""
    head = data[pos : pos + n]
    if len(head) == n and head.isascii():  # no byte has its high bit set
        return list(head), pos + n
    out: list[int] = []
    append = out.append
    try:
        for _ in range(n):
            b = data[pos]
            pos += 1
            if b < 0x80:
                append(b)
                continue
            v, shift = b & 0x7F, 7
            while True:
                b = data[pos]
                pos += 1
                v |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
                if shift > 56:
                    raise IntegrityError(f"manifest: bad or truncated number ({what})")
            append(v)
    except IndexError:
        raise IntegrityError(f"manifest: bad or truncated number ({what})") from None
    return out, pos


def read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """One varint of ``data`` at ``pos`` and the position after it (ends within 9 bytes)."""
    value, shift, end = 0, 0, min(len(data), pos + 9)
    while pos < end:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise IntegrityError(f"manifest: bad or truncated number ({what})")


def unzigzag(values: list[int]) -> list[int]:
    """The signed numbers :func:`zigzag` coded as ``values``."""
    return [(z >> 1) ^ -(z & 1) for z in values]


class Reader:
    """Bounded reads from the decompressed body; IntegrityError past its end. Columns are
    read whole (``varints``, ``hashes``, ``paths``): a method call per number was most of
    a manifest's decoding time."""

    def __init__(self, data: bytes) -> None:
        self.buf = data
        self.data = memoryview(data)
        self.pos = 0
        # Front coding lets a 3-byte entry repeat a 4 KiB path: decoded path bytes are
        # bounded as format 1's are (by the manifest size), not by the body's.
        self.path_bytes = 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left():
            raise IntegrityError(f"manifest: {what} runs past the end ({n} bytes wanted)")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def varint(self, what: str) -> int:
        n, shift, data = 0, 0, self.buf
        while self.pos < len(data) and shift < 63:
            b = data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
        raise IntegrityError(f"manifest: bad or truncated number ({what})")

    def varints(self, n: int, what: str) -> list[int]:
        """A column of ``n`` unsigned numbers (``n`` already bounded by the bytes left)."""
        out, self.pos = read_varints(self.buf, self.pos, n, what)
        return out

    def zigzags(self, n: int, what: str) -> list[int]:
        """A column of ``n`` signed numbers."""
        return unzigzag(self.varints(n, what))

    def hashes(self, n: int, what: str, width: int = 32) -> list[str]:
        """``n`` values of ``width`` bytes as hex: one ``hex()`` of the column, then slices."""
        col, w = self.take(width * n, what).hex(), 2 * width
        return [col[i : i + w] for i in range(0, w * n, w)]

    def count(self, what: str, most: int, min_bytes_each: int) -> int:
        """A count, bounded by the format and by the bytes it needs (before allocating)."""
        n = self.varint(what)
        if n > most or n * min_bytes_each > self.left():
            raise IntegrityError(f"manifest lists {n} {what}: more than allowed or present")
        return n

    def zigzag(self, what: str) -> int:
        z = self.varint(what)
        return z >> 1 if not z & 1 else -((z + 1) >> 1)

    def paths(self, n: int, what: str) -> list[str]:
        """``n`` front-coded paths, each checked by ``check_relpath``."""
        data, pos, prev, total = self.buf, self.pos, b"", self.path_bytes
        raws: list[bytes] = []
        try:
            for _ in range(n):
                common = data[pos]  # both numbers are mostly a byte: the rest is a call
                if common < 0x80:
                    pos += 1
                else:
                    common, pos = read_varint(data, pos, what)
                rest = data[pos]
                if rest < 0x80:
                    pos += 1
                else:
                    rest, pos = read_varint(data, pos, what)
                if common > len(prev) or common + rest > MAX_PATH_BYTES:
                    raise IntegrityError(f"manifest: bad {what} encoding")
                if pos + rest > len(data):
                    raise IntegrityError(
                        f"manifest: {what} runs past the end ({rest} bytes wanted)"
                    )
                raw = prev[:common] + data[pos : pos + rest]
                pos += rest
                total += len(raw)
                if total > MAX_MANIFEST_BYTES:
                    raise IntegrityError(
                        f"manifest: its paths come to more than {MAX_MANIFEST_BYTES} bytes"
                    )
                raws.append(raw)
                prev = raw
        except IndexError:
            raise IntegrityError(f"manifest: bad or truncated number ({what})") from None
        self.pos, self.path_bytes = pos, total
        # One decode of them all, NUL between: UTF-8 resynchronizes at every character, so
        # it fails if and only if one of them is not UTF-8 on its own.
        try:
            out = b"\x00".join(raws).decode().split("\x00") if raws else []
        except UnicodeDecodeError as e:
            raise IntegrityError(f"manifest: {what} is not UTF-8") from e
        if len(out) != len(raws):  # one holds a NUL: check_relpath refuses it
            out = [raw.decode() for raw in raws]
        check_relpaths(out, what)
        return out


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
