"""Delta chunks: a publisher with its parent's bytes stores changed chunks as deltas;
warm and cold readers rebuild exactly the published bytes (or refuse with a documented
error), chains stay bounded, and prune keeps every chunk a retained chain needs."""

from __future__ import annotations

import os
import random
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import runs

from chroma_snapshots import (
    CachedStore,
    FallbackStore,
    RefValue,
    RemoteStore,
    VersionId,
    open_backend,
)
from chroma_snapshots.engine import manifest_v2
from chroma_snapshots.engine.keys import manifest_key, pack_key, ref_key
from chroma_snapshots.engine.manifest_v2 import chain_depth
from chroma_snapshots.engine.models import Manifest, is_link_key, link_key
from chroma_snapshots.engine.signing import Signer
from chroma_snapshots.engine.validation import MAX_CHAIN, utc_now
from chroma_snapshots.errors import IntegrityError, InvalidInputError, SnapshotNotFoundError
from chroma_snapshots.ops.sync import sync_version
from chroma_snapshots.testing.conformance import read_tree, write_tree

CS = 4096
SIZE = 24 * CS + 100  # 25 chunks, the last one short


def _store(signer: Signer | None = None) -> RemoteStore:
    backend = open_backend(f"memory://delta-{uuid.uuid4().hex}")
    return RemoteStore(backend, chunk_size=CS, pack_target=32 * CS, signer=signer)


def _edit(data: bytes, seed: int) -> bytes:
    """A few bytes changed in every chunk, the way HNSW links and SQLite pages change."""
    rng, out = random.Random(seed), bytearray(data)
    for start in range(0, len(out), CS):
        for _ in range(3):
            at = start + rng.randrange(min(CS, len(out) - start))
            out[at] = rng.randrange(256)
    return bytes(out)


def _versions(store: RemoteStore, tmp_path: Path, n: int) -> list[tuple[str, Path]]:
    """``n`` versions of one file, each an edit of the one before, each published with
    the parent's bytes at hand; returns (version, source copy) pairs."""
    data = os.urandom(SIZE)
    out: list[tuple[str, Path]] = []
    for i in range(n):
        src = write_tree(tmp_path / f"src{i}", {"seg/data_level0.bin": data, "header": b"h"})
        parent = out[-1][1] if out else None
        out.append((store.publish("db", src, parent_dir=parent).version, src))
        data = _edit(data, i)
    return out


def _deltas(m: Manifest) -> int:
    return sum(c.codec == "zdelta" for c in m.chunks.values())


def test_changed_chunks_are_stored_as_deltas_and_read_back_cold(tmp_path: Path) -> None:
    store = _store()
    (_v1, _), (v2, src2) = _versions(store, tmp_path, 2)
    m = store.load_manifest("db", v2)
    used = {h for f in m.files for h in f.chunks}
    assert sum(m.chunks[h].codec == "zdelta" for h in used) == 25  # every chunk changed
    stored = sum(m.chunks[h].length for h in used if m.chunks[h].codec == "zdelta")
    assert stored < SIZE / 20  # a few bytes per chunk, not the chunk
    out = store.checkout("db", v2, tmp_path / "cold")
    assert read_tree(out.path) == read_tree(src2)
    assert out.stats.bytes_downloaded >= SIZE  # cold: the keyframes and the deltas
    assert store.verify("db", v2).ok


def test_without_the_parent_bytes_chunks_are_stored_whole(tmp_path: Path) -> None:
    store = _store()
    [(_, src1)] = _versions(store, tmp_path, 1)
    src2 = write_tree(tmp_path / "s2", {"seg/data_level0.bin": _edit(
        (src1 / "seg/data_level0.bin").read_bytes(), 9), "header": b"h"})  # fmt: skip
    v2 = store.publish("db", src2).version
    assert _deltas(store.load_manifest("db", v2)) == 0
    shutil.rmtree(src1 / "seg")  # a parent_dir that lost its files: no deltas, no error
    v3 = store.publish("db", src1, parent_dir=src2).version
    assert read_tree(store.checkout("db", v3, tmp_path / "o").path) == read_tree(src1)


def test_chains_are_bounded_by_keyframes(tmp_path: Path) -> None:
    store = _store()
    versions = _versions(store, tmp_path, MAX_CHAIN + 3)
    depths = []
    for version, _ in versions:
        m = store.load_manifest("db", version)
        f = next(f for f in m.files if f.path == "seg/data_level0.bin")
        depths.append(max(chain_depth(m.chunks, h) for h in f.chunks))
    assert depths == [*range(MAX_CHAIN + 1), 0, 1]  # a keyframe once the cap is reached
    for version, src in versions[-3:]:
        out = store.checkout("db", version, tmp_path / f"out-{version}")
        assert read_tree(out.path) == read_tree(src)


@pytest.mark.parametrize("inner", ["remote", "fallback"])
def test_a_warm_cache_applies_deltas_to_its_cached_base(tmp_path: Path, inner: str) -> None:
    """Also under a FallbackStore whose first store lacks the data: the cache's copy of the
    parent reaches the source of truth's publish (deltas), and the local copies still serve
    the materialization that fails over to the second store."""
    store = _store()
    source = store if inner == "remote" else FallbackStore([_store(), store], primary=1)
    cached = CachedStore(source, tmp_path / "cache")
    data = os.urandom(SIZE)
    cached.publish("db", write_tree(tmp_path / "a", {"seg/data_level0.bin": data}))
    cached.checkout("db").release()
    src2 = write_tree(tmp_path / "b", {"seg/data_level0.bin": _edit(data, 1)})
    info = cached.publish("db", src2)  # the cache hands its copy of the parent over
    m = store.load_manifest("db", info.version)
    assert _deltas(m) == 25
    assert sum(is_link_key(h) for h in m.chunks) == 25  # the bases: found locally by place
    assert info.stats.bytes_uploaded < SIZE / 4
    got = cached.checkout("db")
    assert read_tree(got.path) == read_tree(src2)
    assert got.stats.bytes_downloaded < SIZE / 10  # the deltas, not the chunks
    got.release()


def test_a_damaged_local_base_costs_the_chain_never_wrong_bytes(tmp_path: Path) -> None:
    store = _store()
    cached = CachedStore(store, tmp_path / "cache")
    data = os.urandom(SIZE)
    cached.publish("db", write_tree(tmp_path / "a", {"seg/data_level0.bin": data}))
    old = cached.checkout("db")
    old.release()
    src2 = write_tree(tmp_path / "b", {"seg/data_level0.bin": _edit(data, 1)})
    cached.publish("db", src2)
    with open(old.path / "seg/data_level0.bin", "r+b") as f:  # a consumer wrote to it
        f.write(b"\0" * CS * 3)
    got = cached.checkout("db")
    assert read_tree(got.path) == read_tree(src2)
    got.release()


def _plant(store: RemoteStore, m: Manifest) -> str:
    data = manifest_v2.encode(m)
    version = str(VersionId.for_manifest(data, m.created_at))
    store.backend.put(manifest_key("db", version), data)
    found = store.read_ref("db")  # one generation on: readers refuse a ref gone backwards
    gen = 1 if found is None else found[0].generation + 1
    store.backend.put(ref_key("db", "latest"), RefValue(version, gen, utc_now()).to_json())
    return version


def _nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_a_delta_against_the_wrong_base_is_refused(tmp_path: Path) -> None:
    store = _store()
    _, (v2, _) = _versions(store, tmp_path, 2)
    m = store.load_manifest("db", v2)
    a, b = (m.chunks[h] for h in sorted(h for h, c in m.chunks.items() if c.codec == "zdelta")[:2])
    # two deltas swap bases: a valid table (every entry used), each with the wrong base
    chunks = {**m.chunks, a.hash: replace(a, base=b.base), b.hash: replace(b, base=a.base)}
    _plant(store, replace(m, chunks=chunks))
    with pytest.raises(IntegrityError, match=r"wrong bytes|corrupt"):
        store.checkout("db", dest=tmp_path / "out")
    _nothing_left(tmp_path)


def test_links_swapped_between_places_are_refused_cold_and_warm(tmp_path: Path) -> None:
    """Two chain links (known by place, without a hash) trade places: each delta then rests
    on the wrong base, cold (downloaded) or warm (the chunk the cached copy has there)."""
    store = _store()
    cached = CachedStore(store, tmp_path / "cache")
    (v1, _), (v2, _) = _versions(store, tmp_path, 2)
    cached.checkout("db", v1).release()
    m = store.load_manifest("db", v2)
    a, b = (m.chunks[h] for h in sorted(h for h in m.chunks if is_link_key(h))[:2])
    assert a.size == b.size == CS
    moved = {h: c for h, c in m.chunks.items() if h not in (a.hash, b.hash)}
    for x, y in ((a, b), (b, a)):
        key = link_key(y.pack, y.offset)
        moved[key] = replace(x, hash=key, pack=y.pack, offset=y.offset, length=y.length)
    swap = {a.hash: b.hash, b.hash: a.hash}
    for h, c in moved.items():
        if c.base is not None:
            moved[h] = replace(c, base=swap.get(c.base, c.base))
    _plant(store, replace(m, chunks=moved))
    with pytest.raises(IntegrityError, match=r"wrong bytes|corrupt"):
        store.checkout("db", dest=tmp_path / "out")
    _nothing_left(tmp_path)
    with pytest.raises(IntegrityError, match=r"wrong bytes|corrupt"):
        cached.checkout("db")


def test_a_missing_base_pack_is_not_found(tmp_path: Path) -> None:
    store = _store()
    (v1, _), (v2, _) = _versions(store, tmp_path, 2)
    for pack in store.load_manifest("db", v1).packs:
        store.backend.delete(pack_key("db", pack))
    with pytest.raises(SnapshotNotFoundError):
        store.checkout("db", v2, tmp_path / "out")
    _nothing_left(tmp_path)
    assert any("missing" in p for p in store.verify("db", v2).problems)


def test_prune_keeps_every_chunk_a_retained_chain_needs(tmp_path: Path) -> None:
    store = _store()
    versions = _versions(store, tmp_path, 4)
    report = store.prune("db", keep_last=1, min_age=0)
    assert set(report.deleted_versions) == {v for v, _ in versions[:3]}
    last, src = versions[-1]
    m = store.load_manifest("db", last)
    assert max(chain_depth(m.chunks, h) for h in m.chunks) == 3  # the chain spans 4 versions
    assert store.verify("db", last).ok
    assert read_tree(store.checkout("db", last, tmp_path / "out").path) == read_tree(src)


def test_signed_deltas_round_trip_and_tampering_is_refused(tmp_path: Path) -> None:
    store = _store(Signer.from_spec("k1:0123456789abcdef0123"))
    _, (v2, src2) = _versions(store, tmp_path, 2)
    assert read_tree(store.checkout("db", v2, tmp_path / "out").path) == read_tree(src2)
    key = manifest_key("db", v2)
    data = store.backend.get(key).data
    store.backend.put(key, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="signature"):
        store.load_manifest("db", v2)


def test_a_cached_version_with_deltas_is_repaired(tmp_path: Path) -> None:
    """A consumer overwrote part of a cached version made of deltas: the repair rebuilds
    those chunks, from the cached parent where it can, else from the chains."""
    store = _store()
    # the parent stays cached (not patched into v2): the first repair reads from it
    cached = CachedStore(store, tmp_path / "cache", patch_in_place=False)
    data = os.urandom(SIZE)
    cached.publish("db", write_tree(tmp_path / "a", {"seg/data_level0.bin": data}))
    parent = cached.checkout("db")
    parent.release()
    src2 = write_tree(tmp_path / "b", {"seg/data_level0.bin": _edit(data, 1)})
    cached.publish("db", src2)
    for evict_parent in (False, True):
        got = cached.checkout("db")
        got.release()
        with open(got.path / "seg/data_level0.bin", "r+b") as f:
            f.seek(CS)
            f.write(b"\xff" * CS * 4)
        if evict_parent:
            assert cached.evict("db", parent.info.version)
        again = cached.checkout("db")
        assert read_tree(again.path) == read_tree(src2)
        again.release()


@settings(
    max_examples=runs(ci=60, long=1000),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_tampered_delta_tables_never_yield_wrong_bytes(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Any entry of a three-version chain's table re-pointed, resized, moved or re-coded:
    the checkout refuses with a documented error or writes exactly the published bytes."""
    tmp = tmp_path_factory.mktemp("tamper")
    store = _store()
    versions = _versions(store, tmp, 3)
    last, src = versions[-1]
    m = store.load_manifest("db", last)
    hashes = sorted(m.chunks)
    c = m.chunks[data.draw(st.sampled_from(hashes))]
    field = data.draw(st.sampled_from(["base", "length", "offset", "codec", "pack"]))
    if field == "base":
        changed = replace(c, base=data.draw(st.sampled_from(hashes)), codec="zdelta")
    elif field == "codec":
        changed = replace(c, codec=data.draw(st.sampled_from(["none", "zstd"])), base=None)
    elif field == "pack":
        changed = replace(c, pack=data.draw(st.sampled_from(sorted(m.packs))))
    elif field == "length":
        changed = replace(c, length=data.draw(st.integers(0, 2 * CS)))
    else:
        changed = replace(c, offset=data.draw(st.integers(0, 2 * CS)))
    try:
        _plant(store, replace(m, chunks={**m.chunks, c.hash: changed}))
    except InvalidInputError:
        return  # not even expressible in format 2 (a length above the size)
    try:
        out = store.checkout("db", dest=tmp / "out")
    except (IntegrityError, SnapshotNotFoundError) as e:
        refusal = str(e)
    else:
        assert read_tree(out.path) == read_tree(src)
        return
    assert refusal  # a documented error that says why


def test_sync_copies_a_version_with_its_chains(tmp_path: Path) -> None:
    src_store, dst_store = _store(), _store()
    _, (v2, src2) = _versions(src_store, tmp_path, 2)
    sync_version(src_store, dst_store, "db", v2)
    key = manifest_key("db", v2)
    assert dst_store.backend.get(key).data == src_store.backend.get(key).data
    assert read_tree(dst_store.checkout("db", dest=tmp_path / "out").path) == read_tree(src2)
    assert dst_store.verify("db", v2).ok


@pytest.mark.parametrize("older", [True, False])
def test_a_manifest_lying_about_places_cannot_break_a_warm_refresh(
    tmp_path: Path, older: bool
) -> None:
    """A planted version whose table swaps two chunks' places (refused cold, served warm by
    hash) must not make the cache apply an honest version's deltas to the wrong bases:
    the chain is then read from the store, and the bytes are exact."""
    from datetime import timedelta

    store = _store()
    cached = CachedStore(store, tmp_path / "cache")
    d1 = os.urandom(SIZE)
    d2 = _edit(d1, 1)
    v1 = cached.publish("db", write_tree(tmp_path / "a", {"f.bin": d1})).version
    cached.checkout("db", v1).release()
    v2 = cached.publish("db", write_tree(tmp_path / "b", {"f.bin": d2})).version
    cached.evict("db", v2)
    m1 = store.load_manifest("db", v1)
    a, b = (m1.chunks[h] for h in m1.files[0].chunks[:2])
    lied = {
        **m1.chunks,
        a.hash: replace(a, pack=b.pack, offset=b.offset, length=b.length),
        b.hash: replace(b, pack=a.pack, offset=a.offset, length=a.length),
    }
    shift = timedelta(seconds=-5 if older else 5)  # oldest or newest of the cached versions
    mx = replace(m1, chunks=lied, created_at=m1.created_at + shift, message="lies")
    data = manifest_v2.encode(mx)
    vx = str(VersionId.for_manifest(data, mx.created_at))
    store.backend.put(manifest_key("db", vx), data)
    with pytest.raises(IntegrityError):
        store.checkout("db", vx, tmp_path / "cold-x")
    cached.checkout("db", vx).release()  # from the cache, by hash: now cached beside v1
    got = cached.checkout("db", v2)
    assert read_tree(got.path) == {"f.bin": d2}
    got.release()
