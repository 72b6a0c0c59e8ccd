"""The byte-level pieces of format 2 manifests: varints, zigzag numbers, front-coded paths,
bounded reads of a hostile body, and the one zstd frame around it (docs/FORMAT.md).

Reading treats every byte as hostile: a number ends within 9 bytes, a count is bounded by
the format and by the bytes left before anything is allocated, decoded paths are bounded
in all, and the frame must declare its size and hold nothing after it. Anything wrong is
an IntegrityError.
"""

from __future__ import annotations

from collections.abc import Iterator

import zstandard

from chroma_snapshots.engine.validation import (
    MAX_CHUNK_SIZE,
    MAX_MANIFEST_BYTES,
    MAX_PATH_BYTES,
    check_relpath,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError

MAGIC = b"CSM\x02"


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


def front_coded(out: bytearray, paths: list[str]) -> None:
    """Append each path as (bytes shared with the previous one, the rest)."""
    prev = b""
    for p in paths:
        b = p.encode()
        common = 0
        for x, y in zip(prev, b, strict=False):
            if x != y:
                break
            common += 1
        varint(out, common)
        varint(out, len(b) - common)
        out += b[common:]
        prev = b


class Reader:
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
