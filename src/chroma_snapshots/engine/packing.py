"""Packing new chunks: each stored as zstd, as a delta against the parent's chunk at the
same offset, or raw (whichever is smallest and worth it), appended to packs of about
``target`` bytes; a pack is named by the sha256 of its bytes, so a pack key can never hold
two different contents. Encoding runs on the publish's pool, in order-preserving batches.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future

import zstandard

from chroma_snapshots.engine import delta
from chroma_snapshots.engine.deadline import Deadline, wait_all
from chroma_snapshots.engine.models import Chunk
from chroma_snapshots.engine.validation import sha256_hex

DEFAULT_PACK_TARGET = 16 << 20
# Storing compressed only pays when it saves something real: float vectors barely compress.
_MIN_SAVING = 0.97
_THREAD = threading.local()


class PackWriter:
    """Appends new chunks to packs and hands each full pack to ``upload(pack_id, data)``.

    A chunk's location is known only once its pack is sealed (the pack id is
    the hash of its bytes), so locations are collected in :attr:`chunks`.

    With a ``pool``, chunks are compressed (and delta-encoded) there, in batches of about
    ``_BATCH_BYTES``, while the caller reads and hashes the next ones; at most
    ``_MAX_IN_FLIGHT`` bytes of chunks wait for it (memory stays bounded). Results are
    appended in the order chunks were added, so the packs (and their ids) are the same
    as without a pool, whatever order the threads finish in.
    """

    def __init__(
        self,
        upload: Callable[[str, bytes], None],
        *,
        target: int = DEFAULT_PACK_TARGET,
        level: int | None = 3,
        pool: Executor | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self._upload = upload
        self._target = target
        self._level = level
        self._pool = pool if level is not None else None  # raw chunks: nothing to encode
        self._deadline = deadline
        self._buf = bytearray()
        self._pending: list[tuple[str, int, int, int, str, str | None]] = []
        self._batch: list[_Job] = []
        self._batch_bytes = 0
        self._jobs: deque[tuple[int, Future[list[_Encoded]]]] = deque()
        self._in_flight = 0
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
        self._batch.append((digest, raw, base))
        self._batch_bytes += len(raw)
        if self._batch_bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_CHUNKS:
            self._submit()

    def flush(self) -> None:
        """Encode what is left, seal the current pack (if any) and upload it."""
        self._submit()
        while self._jobs:
            self._collect(block=True)
        self._seal()

    def _submit(self) -> None:
        if not self._batch:
            return
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        if self._pool is None:
            self._append(_encode_all(self._level, batch))
            return
        self._jobs.append((size, self._pool.submit(_encode_all, self._level, batch)))
        self._in_flight += size
        while self._jobs and (self._jobs[0][1].done() or self._in_flight > _MAX_IN_FLIGHT):
            self._collect(block=True)

    def _collect(self, block: bool) -> None:
        size, job = self._jobs[0]
        if not block and not job.done():
            return
        if self._deadline is not None:
            encoded = wait_all([job], self._deadline, "compressing chunks")[0]
        else:
            encoded = job.result()
        self._jobs.popleft()
        self._in_flight -= size
        self._append(encoded)

    def _append(self, encoded: list[_Encoded]) -> None:
        for digest, data, size, codec, base_hash in encoded:
            self._pending.append((digest, len(self._buf), len(data), size, codec, base_hash))
            self._buf += data
            if len(self._buf) >= self._target:
                self._seal()

    def _seal(self) -> None:
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


# A chunk to encode: (hash, bytes, the parent's chunk at its offset as (hash, bytes) or None)
_Job = tuple[str, bytes, tuple[str, bytes] | None]
# ...and encoded: (hash, stored bytes, raw size, codec, base hash or None)
_Encoded = tuple[str, bytes, int, str, str | None]
# Batches of about 1 MiB keep each hand-off to a thread worth its cost (100 B chunks too);
# 16 MiB in flight is one pack's worth and a few batches per worker.
_BATCH_BYTES = 1 << 20
_BATCH_CHUNKS = 1024
_MAX_IN_FLIGHT = 16 << 20


def _encode_all(level: int | None, batch: list[_Job]) -> list[_Encoded]:
    """Each chunk as stored: zstd if that saves something real, a delta against its base
    if that takes under half of it, else raw (this thread's own compressor)."""
    compressor = _compressor(level) if level is not None else None
    out: list[_Encoded] = []
    for digest, raw, base in batch:
        data, codec, base_hash = raw, "none", None
        if compressor is not None:
            packed = compressor.compress(raw)
            if len(packed) < len(raw) * _MIN_SAVING:
                data, codec = packed, "zstd"
            if base is not None and base[0] != digest:
                patch = delta.encode(raw, base[1], delta.LEVEL)
                if len(patch) * 2 < len(data):
                    data, codec, base_hash = patch, delta.CODEC, base[0]
        out.append((digest, data, len(raw), codec, base_hash))
    return out


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor at ``level`` (one may not be used by two threads at once)."""
    found: dict[int, zstandard.ZstdCompressor] | None = getattr(_THREAD, "zstd_out", None)
    if found is None:
        found = _THREAD.zstd_out = {}
    if level not in found:
        found[level] = zstandard.ZstdCompressor(level=level)
    return found[level]
