"""Encoding on the publish's pool gives the same packs as encoding in order on one thread,
and reading files in batches gives every chunk of every file, in order."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from chroma_snapshots.engine import packing
from chroma_snapshots.engine.chunking import hashed_chunks
from chroma_snapshots.engine.deadline import Deadline, WorkerPool
from chroma_snapshots.engine.packing import PackWriter
from chroma_snapshots.engine.source import scan_source
from chroma_snapshots.engine.validation import sha256_hex


def _chunks(n: int, seed: int) -> list[tuple[str, bytes, tuple[str, bytes] | None]]:
    """Chunks that compress, that do not, and that are small edits of a base."""
    rng, out = random.Random(seed), []
    for i in range(n):
        kind = i % 3
        raw = (b"row %d " % i) * 600 if kind == 0 else rng.randbytes(rng.randrange(1, 5000))
        base = None
        if kind == 2:
            base_raw = bytearray(raw)
            base_raw[: min(4, len(raw))] = b"\xff" * min(4, len(raw))
            base = (sha256_hex(bytes(base_raw)), bytes(base_raw))
        out.append((sha256_hex(raw), raw, base))
    return out


def _write(chunks: list[tuple[str, bytes, tuple[str, bytes] | None]], pool: WorkerPool | None
           ) -> tuple[list[tuple[str, bytes]], dict[str, object]]:  # fmt: skip
    packs: list[tuple[str, bytes]] = []
    writer = PackWriter(lambda pid, data: packs.append((pid, data)), target=20_000, pool=pool,
                        deadline=Deadline(60) if pool else None)  # fmt: skip
    for digest, raw, base in chunks:
        if digest not in writer:
            writer.add(digest, raw, base)
    writer.flush()
    return packs, dict(writer.chunks)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_pool_gives_the_packs_one_thread_gives(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packing, "_BATCH_BYTES", 7_000)  # many batches, a few in flight
    monkeypatch.setattr(packing, "_MAX_IN_FLIGHT", 30_000)
    chunks = _chunks(300, seed)
    alone = _write(chunks, None)
    with WorkerPool(4) as pool:
        pooled = _write(chunks, pool)
    assert pooled == alone
    codecs = {c.codec for c in alone[1].values()}  # type: ignore[attr-defined]
    assert codecs == {"none", "zstd", "zdelta"}  # every path of the encoder was taken
    assert len(alone[0]) > 3


def test_an_encoding_failure_reaches_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(level: int | None, batch: object) -> object:
        raise MemoryError("no room")

    monkeypatch.setattr(packing, "_encode_all", broken)
    with WorkerPool(2) as pool, pytest.raises(MemoryError):
        _write(_chunks(10, 1), pool)


def test_batched_reads_give_each_files_chunks_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("chroma_snapshots.engine.chunking._SMALL_BATCH", 3)
    sizes = [0, 10, 100, 0, 250, 99, 1, 100, 1000, 3, 0, 7]  # small, empty and large
    for i, size in enumerate(sizes):
        (tmp_path / f"f{i:02d}").write_bytes(os.urandom(size))
    files, _ = scan_source(tmp_path)
    expected = [
        (i, p.read_bytes()[o : o + 100])
        for i, f in enumerate(files)
        for p in [Path(f.path)]
        for o in range(0, p.stat().st_size, 100)
    ]
    with WorkerPool(3) as pool:
        for use in (None, pool):
            got = list(hashed_chunks(files, 100, _sha256_all, sha256_hex, use))
            assert [(i, raw) for i, raw, _ in got] == expected
            assert all(sha256_hex(raw) == h for _, raw, h in got)


def _sha256_all(chunks: list[bytes]) -> list[str]:
    return [*map(sha256_hex, chunks)]
