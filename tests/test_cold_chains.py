"""A cold reader of a version with delta chains reads each pack once: the chain links below
the deltas travel in the same coalesced reads as the plain chunks (within the stash's
memory bound; beyond it, in batches afterwards), and every byte is still exact."""

from __future__ import annotations

import os
import random
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from chroma_snapshots import RemoteStore, open_backend
from chroma_snapshots.engine import stash
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.keys import pack_key
from chroma_snapshots.engine.manifest_v2 import chain_depth
from chroma_snapshots.engine.models import Chunk, Manifest
from chroma_snapshots.engine.placer import Buffer, Placer
from chroma_snapshots.engine.progress import StatsRecorder
from chroma_snapshots.engine.transfer import Read, plan_reads
from chroma_snapshots.errors import StorageTimeoutError
from chroma_snapshots.testing.conformance import read_tree, write_tree

CS = 4096


def _chained(tmp_path: Path, chunks: int, changed: Callable[[int], bool]) -> RemoteStore:
    """A store whose latest version changes the chunks ``changed`` picks of a file of
    ``chunks`` chunks, published with the parent at hand (so as deltas); 10 chunks a pack,
    so packs straddle batches of deltas."""
    store = RemoteStore(
        open_backend(f"memory://chains-{uuid.uuid4().hex}"), chunk_size=CS, pack_target=10 * CS
    )
    data = bytearray(os.urandom(chunks * CS))
    old = write_tree(tmp_path / "v1", {"seg/data_level0.bin": bytes(data)})
    store.publish("db", old)
    rng = random.Random(3)
    for i in range(chunks):
        if changed(i):
            data[i * CS + rng.randrange(CS)] ^= 0xFF
    new = write_tree(tmp_path / "v2", {"seg/data_level0.bin": bytes(data)})
    store.publish("db", new, parent_dir=old)
    return store


def _pack_reads(store: RemoteStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the key of every ranged pack read the store's backend serves."""
    reads: list[str] = []
    get_into = store.backend.get_into

    def counting(key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        if "/packs/" in key:
            reads.append(key)
        return get_into(key, byte_range, buf)

    monkeypatch.setattr(store.backend, "get_into", counting)
    return reads


def _latest(store: RemoteStore) -> Manifest:
    return store.load_manifest("db", store.current_version("db", "latest")[0])


def _deltas_bytes(m: Manifest) -> int:
    return sum(c.length for c in m.chunks.values() if c.base is not None)


def _cold_reads(
    store: RemoteStore, m: Manifest, room: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """The pack reads of an exact cold checkout of ``m`` with a stash of ``room`` bytes."""
    monkeypatch.setattr(stash, "STASH_BYTES", room)
    reads = _pack_reads(store, monkeypatch)
    out = store.checkout("db", dest=tmp_path / "cold")
    assert read_tree(out.path) == read_tree(tmp_path / "v2")
    return reads


def _each_pack_once(reads: list[str], m: Manifest) -> bool:
    return sorted(reads) == sorted({pack_key("db", c.pack) for c in m.chunks.values()})


@pytest.mark.parametrize(
    ("chunks", "changed"),
    [
        (24, lambda i: i % 2 == 0),  # old packs hold plain chunks and links side by side
        (600, lambda i: True),  # more deltas than a batch, links spread over many packs
    ],
)
def test_a_cold_reader_reads_each_pack_of_a_chained_version_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: int, changed: Callable[[int], bool]
) -> None:
    store = _chained(tmp_path, chunks, changed)
    m = _latest(store)
    assert sum(c.base is not None for c in m.chunks.values()) == sum(map(changed, range(chunks)))
    reads = _pack_reads(store, monkeypatch)
    out = store.checkout("db", dest=tmp_path / "cold")
    assert read_tree(out.path) == read_tree(tmp_path / "v2")
    assert _each_pack_once(reads, m)


def test_chains_beyond_the_stash_bound_are_read_afterwards_and_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _chained(tmp_path, 600, lambda i: True)
    m = _latest(store)
    # room for half the deltas: the other half's chains are read again, in batches
    reads = _cold_reads(store, m, _deltas_bytes(m) // 2, tmp_path, monkeypatch)
    assert len(reads) > len({c.pack for c in m.chunks.values()})


@pytest.mark.parametrize("workers", [1, 8])
def test_keyframes_read_after_their_deltas_take_no_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    store = _chained(tmp_path, 600, lambda i: True)
    m = _latest(store)
    # room for the deltas alone: the keyframes below them (600 x 4 KiB) come after every
    # delta is kept, complete their chains as they pass and are never copied
    one = RemoteStore(store.backend, chunk_size=CS, workers=workers)
    reads = _cold_reads(one, m, _deltas_bytes(m), tmp_path, monkeypatch)
    assert _each_pack_once(reads, m)


def test_two_deep_chains_keep_only_their_deltas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _chained(tmp_path, 300, lambda i: True)
    v2 = read_tree(tmp_path / "v2")
    data = bytearray(v2["seg/data_level0.bin"])
    for i in range(0, len(data), CS):
        data[i] ^= 0x55
    old = write_tree(tmp_path / "v2", v2)
    store.publish("db", write_tree(tmp_path / "v3", {"seg/data_level0.bin": bytes(data)}),
                  parent_dir=old)  # fmt: skip
    m = _latest(store)
    assert max(chain_depth(m.chunks, h) for h in m.chunks) == 2
    monkeypatch.setattr(stash, "STASH_BYTES", _deltas_bytes(m))  # both levels' deltas
    reads = _pack_reads(store, monkeypatch)
    out = store.checkout("db", dest=tmp_path / "cold")
    assert read_tree(out.path) == {"seg/data_level0.bin": bytes(data)}
    assert _each_pack_once(reads, m)


Pieces = Callable[[list[Chunk]], None]


def _stash_of(tmp_path: Path, deadline: Deadline) -> tuple[stash.DeltaStash, list[Chunk], Pieces]:
    """A stash for a cold checkout of 24 chunks, each a delta on a link of 4 KiB; its
    deltas; and a way to hand it the reads that carry some pieces."""
    store = _chained(tmp_path, 24, lambda i: True)
    m = _latest(store)
    deltas = [c for c in m.chunks.values() if c.base is not None]
    placer = Placer(tmp_path / "w", m)
    placer.create_files()
    kept = stash.DeltaStash(deltas, m.chunks, None, placer, StatsRecorder(), deadline)

    def bring(pieces: list[Chunk]) -> None:
        for r in plan_reads(pieces):
            key = pack_key("db", r.pack)
            kept.take(r, store.backend.get(key, byte_range=(r.start, r.end)).data)

    return kept, deltas, bring


def test_deltas_completed_after_the_deadline_are_not_applied(tmp_path: Path) -> None:
    now = [0.0]
    kept, deltas, bring = _stash_of(tmp_path, Deadline(10, clock=lambda: now[0]))
    bring(deltas)  # the deltas alone complete no chain
    assert not kept.applied
    now[0] = 11
    with pytest.raises(StorageTimeoutError):
        bring(kept.links[:1])
    assert not kept.applied


def test_links_that_come_first_leave_room_for_the_deltas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stash, "STASH_BYTES", 3 * CS)  # 3 links, or 2 and every delta
    kept, deltas, bring = _stash_of(tmp_path, Deadline(10))
    assert sum(c.length for c in deltas) < CS
    assert all(c.length == CS for c in kept.links)
    bring(kept.links)
    bring(deltas)
    assert len(kept.applied) == 2
    assert set(kept.stored) == {c.hash for c in deltas} - kept.applied  # links dropped


def test_a_read_copies_no_more_pieces_than_the_stash_has_room_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stash, "STASH_BYTES", 3 * CS)  # every delta and 2 of the 24 links
    kept, _, bring = _stash_of(tmp_path, Deadline(10))
    take, grew = kept.take, []

    def measured(r: Read, data: Buffer) -> None:
        tracemalloc.start()
        try:
            take(r, data)
            grew.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()

    monkeypatch.setattr(kept, "take", measured)
    bring(kept.links)  # a read per pack: 10 links of 4 KiB each
    assert len(kept.stored) == 2
    # pieces that do not fit are never copied: 8 workers each reading 8 MiB of links
    # once held 64 MiB of copies beside the stash
    assert max(grew) < 4 * CS
