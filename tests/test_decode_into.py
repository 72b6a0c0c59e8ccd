"""Compressed chunks decompressed into a reused buffer are checked as strictly as before."""

from __future__ import annotations

import os

import pytest
import zstandard

from chroma_snapshots.engine.chunking import decode_chunk
from chroma_snapshots.engine.models import Chunk
from chroma_snapshots.engine.validation import sha256_hex
from chroma_snapshots.errors import IntegrityError

RAW = b"row of text " * 4000 + os.urandom(1000)


def _chunk(stored: bytes) -> Chunk:
    return Chunk(sha256_hex(RAW), "p" * 64, 0, len(stored), len(RAW), "zstd")


def test_decodes_into_the_buffer() -> None:
    stored = zstandard.ZstdCompressor(level=3).compress(RAW)
    out = memoryview(bytearray(len(RAW) + 100))
    got = decode_chunk(_chunk(stored), stored, out)
    assert bytes(got) == RAW
    assert isinstance(got, memoryview)
    assert got.obj is out.obj  # no copy


def test_more_bytes_than_declared_is_refused() -> None:
    # a frame without a content size, holding more than the manifest says
    stored = zstandard.ZstdCompressor(write_content_size=False).compress(RAW + b"tail")
    out = memoryview(bytearray(2 * len(RAW)))
    with pytest.raises(IntegrityError, match="decompresses to other than"):
        decode_chunk(_chunk(stored), stored, out)


def test_fewer_bytes_than_declared_is_refused() -> None:
    stored = zstandard.ZstdCompressor(write_content_size=False).compress(RAW[:-10])
    out = memoryview(bytearray(2 * len(RAW)))
    with pytest.raises(IntegrityError):
        decode_chunk(_chunk(stored), stored, out)


def test_corrupt_frame_and_wrong_hash_are_refused() -> None:
    stored = bytearray(zstandard.ZstdCompressor(level=3).compress(RAW))
    stored[len(stored) // 2] ^= 0xFF
    out = memoryview(bytearray(len(RAW)))
    with pytest.raises(IntegrityError):
        decode_chunk(_chunk(bytes(stored)), bytes(stored), out)
    other = zstandard.ZstdCompressor(level=3).compress(RAW[::-1])
    with pytest.raises(IntegrityError, match="hash mismatch"):
        decode_chunk(_chunk(other), other, out)
