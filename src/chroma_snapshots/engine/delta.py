"""Delta chunks (format 2): a changed chunk stored as zstd against its parent's chunk.

Chroma rewrites ``data_level0.bin`` in place and SQLite rewrites pages in place: a few
bytes change in each 64 KiB chunk. Compressing the new chunk with the parent's chunk at
the same file offset as a raw-content dictionary stores only what changed (measured on a
50,000 x 384 database: 3.7 MiB of deltas instead of 74.8 MiB of changed chunks, +1,000
records). The manifest names the base by hash; :func:`decode` checks the result against
the chunk's own hash, so a wrong, missing or tampered base can never yield wrong bytes.
"""

from __future__ import annotations

import zstandard

from chroma_snapshots.engine.chunkids import chunk_ok
from chroma_snapshots.engine.models import DELTA_CODEC, Chunk, is_link_key
from chroma_snapshots.engine.validation import MAX_CHUNK_SIZE
from chroma_snapshots.errors import IntegrityError

CODEC = DELTA_CODEC
# zstd level of deltas: on the 50,000-record database, +1,000 records' deltas take 3.68 MiB
# at level 1 and 3.67 at level 3, and level 1 builds its match tables from the base in a
# fraction of the time (the base is new for every chunk, so that is most of the cost).
LEVEL = 1

Buffer = bytes | memoryview


def _dictionary(base: Buffer) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def encode(raw: Buffer, base: Buffer, level: int) -> bytes:
    """``raw`` as one zstd frame (content size declared) against ``base``."""
    cctx = zstandard.ZstdCompressor(level=level, dict_data=_dictionary(base))
    return cctx.compress(raw)


def decode(c: Chunk, stored: Buffer, base: Buffer) -> bytes:
    """Apply the delta ``stored`` of chunk ``c`` to its base's bytes and verify the
    result's size and hash (a link known by place has none: its size only, and the caller
    verifies what its chain ends in); IntegrityError for anything else."""
    if c.base is None or len(stored) != c.length:
        raise IntegrityError(f"chunk {c.hash[:12]}: not a delta of {c.length} stored bytes")
    try:
        declared = zstandard.frame_content_size(stored)
        if declared != c.size:  # checked first: the decompressor allocates what it declares
            raise IntegrityError(f"chunk {c.hash[:12]}: delta declares {declared} bytes")
        dctx = zstandard.ZstdDecompressor(
            dict_data=_dictionary(base), max_window_size=MAX_CHUNK_SIZE
        )
        raw = dctx.decompress(stored, max_output_size=c.size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"chunk {c.hash[:12]}: corrupt delta") from e
    # A link known by place (no hash) is verified through the chunk its chain ends in.
    if len(raw) != c.size or (not is_link_key(c.hash) and not chunk_ok(raw, c.hash)):
        raise IntegrityError(
            f"chunk {c.hash[:12]}: delta against {c.base[:12]} decodes to the wrong bytes"
        )
    return raw
