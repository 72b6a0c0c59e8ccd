"""Small files bundled into shared chunks (engine/bundles.py, format 2 layout 2): every
reader serves a slice of a verified bundle, one changed small file moves about one bundle,
and a manifest whose slices do not fit their chunks is refused."""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chroma_snapshots import CachedStore, RemoteStore, open_backend
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.cli.plan import plan_publish
from chroma_snapshots.engine import bundles, manifest_v2
from chroma_snapshots.engine.models import Chunk, FileEntry, Manifest, is_slice
from chroma_snapshots.engine.source import SourceFile, SourceFolders, scan_source
from chroma_snapshots.engine.validation import format_time, parse_time
from chroma_snapshots.errors import IntegrityError, InvalidInputError
from chroma_snapshots.stores.cache import inspect
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree

CS = 16384  # small files: at most 256 bytes; bundles of about as much
T0 = datetime(2026, 12, 2, tzinfo=timezone.utc)


def _files(n: int = 600, seed: int = 3) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {f"d{i // 50}/f{i:04d}.txt": rng.randbytes(rng.randint(1, 200)) for i in range(n)}
    out["big.bin"] = rng.randbytes(10 * CS + 7)
    out["mid.bin"] = rng.randbytes(1000)  # above the limit: a chunk of its own
    out["d3/empty"] = b""
    return out


def _file_store(tmp_path: Path) -> RemoteStore:
    return RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CS, pack_target=64 * CS)


def _manifest(store: RemoteStore, version: str) -> Manifest:
    return store.load_manifest("db", version)


def test_small_files_share_chunks_and_read_back(tmp_path: Path) -> None:
    files = _files()
    store = _file_store(tmp_path)
    v = store.publish("db", write_tree(tmp_path / "src", files)).version
    m = _manifest(store, v)
    slices = [f for f in m.files if is_slice(f, m.chunks)]
    assert len(slices) > 500
    assert len(m.chunks) < 300  # bundles of about 256 bytes: 2-3 files each
    assert {f.path for f in m.files if not is_slice(f, m.chunks)} >= {"big.bin", "mid.bin"}
    assert all(not f.chunks for f in m.files if f.size == 0)
    assert b'"layout":4' in manifest_v2.decompress(manifest_v2.dumps(m))  # BLAKE3 ids too
    assert read_tree(store.checkout("db", v, tmp_path / "out").path) == files
    assert store.verify("db", v).ok


def test_format_1_and_trees_without_small_files_hold_no_slices(tmp_path: Path) -> None:
    files = _files(40)
    old = RemoteStore(open_backend(f"memory://b-{uuid.uuid4().hex}"), chunk_size=CS,
                      manifest_format=1)  # fmt: skip
    v = old.publish("db", write_tree(tmp_path / "src", files)).version
    m = _manifest(old, v)
    assert not any(is_slice(f, m.chunks) for f in m.files)  # format 1 cannot hold them
    assert read_tree(old.checkout("db", v, tmp_path / "out").path) == files
    big = RemoteStore(open_backend(f"memory://b-{uuid.uuid4().hex}"), chunk_size=CS)
    v = big.publish("db", write_tree(tmp_path / "big", {"a": os.urandom(3 * CS)})).version
    m = _manifest(big, v)
    assert not any(is_slice(f, m.chunks) for f in m.files)
    assert all(len(h) == 60 for h in m.chunks)  # format 2 ids: BLAKE3 (layout 4)


def _new_chunks(store: RemoteStore, before: str, after: str) -> set[str]:
    return set(_manifest(store, after).chunks) - set(_manifest(store, before).chunks)


@pytest.mark.parametrize("edit", ["change", "add", "remove", "grow"])
def test_one_small_file_edit_moves_about_one_bundle(tmp_path: Path, edit: str) -> None:
    files = _files(2000, seed=5)
    src = write_tree(tmp_path / "src", files)
    store = _file_store(tmp_path)
    v1 = store.publish("db", src, stamps=False).version
    bundle_bytes = sum(c.size for c in _manifest(store, v1).chunks.values()) / len(
        _manifest(store, v1).chunks
    )
    target = src / "d20/f1000.txt"
    if edit == "change":
        target.write_bytes(b"x" * target.stat().st_size)
    elif edit == "add":
        (src / "d20/f1000a.txt").write_bytes(b"new file")
    elif edit == "remove":
        target.unlink()
    else:
        target.write_bytes(os.urandom(250))
    info = store.publish("db", src, stamps=False)
    fresh = _new_chunks(store, v1, info.version)
    assert 1 <= len(fresh) <= 2  # its bundle (and a neighbour when a boundary moves)
    m2 = _manifest(store, info.version)
    packed = info.stats.bytes_uploaded - len(manifest_v2.dumps(m2))
    assert packed == sum(m2.chunks[h].length for h in fresh) <= 4 * bundle_bytes
    assert read_tree(store.checkout("db", info.version, tmp_path / "out").path) == read_tree(src)


def test_bundle_boundaries_depend_on_the_members_not_their_position() -> None:
    rng = random.Random(1)
    small = [(f"f{i:05d}", rng.randint(1, 256)) for i in range(5000)]
    groups = bundles.cut(small, CS)
    assert all(sum(small[i][1] for i in g) <= CS for g in groups)
    shifted = bundles.cut([("a0000", 100), *small], CS)  # one file more, in front
    ends = {small[g[-1]][0] for g in groups}
    ends_after = {([("a0000", 100), *small])[g[-1]][0] for g in shifted}
    assert len(ends ^ ends_after) <= 2
    mean = sum(n for _, n in small) / len(groups)
    assert CS / 128 < mean < CS / 32  # about CS / 64


def test_a_file_changed_during_publish_is_refused(tmp_path: Path) -> None:
    ((seen,), _) = scan_source(write_tree(tmp_path, {"a": b"abc"}))
    folders = SourceFolders()
    try:
        assert bundles.read_exact(seen, folders) == b"abc"
        for wrong in (2, 4):
            with pytest.raises(InvalidInputError, match="changed"):
                bundles.read_exact(seen._replace(size=wrong), folders)
    finally:
        folders.close()


def test_a_fifo_with_a_writer_swapped_in_reads_as_a_change(tmp_path: Path) -> None:
    """Without a writer a FIFO reads empty (a short read); with one that has written
    nothing, the read fails (EAGAIN): a change either way, never a wait."""
    path = tmp_path / "a"
    os.mkfifo(path)
    writer = os.open(path, os.O_RDWR)  # a writer that never writes
    folders = SourceFolders()
    try:
        with pytest.raises(InvalidInputError, match="changed while it was being published"):
            bundles.read_exact(SourceFile("a", str(path), 3, 0o644, (0, 0)), folders)
    finally:
        folders.close()
        os.close(writer)


def _reading_threads(monkeypatch: pytest.MonkeyPatch) -> set[threading.Thread]:
    """The threads that read bundles from now on."""
    seen: set[threading.Thread] = set()
    real = bundles.read_bundles

    def spy(
        groups: Sequence[Sequence[SourceFile]], digest: Callable[[bytes], str]
    ) -> list[tuple[bytes, str]]:
        seen.add(threading.current_thread())
        return real(groups, digest)

    monkeypatch.setattr(bundles, "read_bundles", spy)
    return seen


def test_small_files_are_read_on_the_publishing_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tree(tmp_path / "src", _files())
    threads = _reading_threads(monkeypatch)
    _file_store(tmp_path).publish("db", src)
    assert threads == {threading.current_thread()}  # a pool hand-off cost more than a read


def test_small_files_slow_to_read_move_to_the_pool_and_give_the_same_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tree(tmp_path / "src", _files())
    inline = RemoteStore(FileBackend(tmp_path / "inline"), chunk_size=CS)
    expected = inline.load_manifest("db", inline.publish("db", src).version).files
    threads = _reading_threads(monkeypatch)
    monkeypatch.setattr(bundles, "_INLINE_NS_PER_FILE", -1)  # every read is "slow"
    pooled = RemoteStore(FileBackend(tmp_path / "pooled"), chunk_size=CS)
    got = pooled.load_manifest("db", pooled.publish("db", src).version).files
    assert threading.current_thread() in threads
    assert len(threads) > 1
    assert got == expected
    assert read_tree(pooled.checkout("db", dest=tmp_path / "out").path) == read_tree(src)


# Readers: the cache, its warm refresh, repair and inspection.


def _cached(backend_store: RemoteStore, tmp_path: Path) -> CachedStore:
    return CachedStore(backend_store, tmp_path / "cache")


@pytest.fixture(params=["file", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> RemoteStore:
    if request.param == "file":
        return _file_store(tmp_path)
    server: MotoServer = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    s3 = S3Backend(bucket, "snaps", settings=S3Settings(endpoint_url=server.endpoint_url))
    return RemoteStore(s3, chunk_size=CS, pack_target=64 * CS)


def test_cache_round_trip_warm_refresh_and_repair(remote: RemoteStore, tmp_path: Path) -> None:
    files = _files()
    src = write_tree(tmp_path / "src", files)
    cache = _cached(remote, tmp_path)
    cache.publish("db", src)
    with cache.checkout("db") as snap:
        assert read_tree(snap.path) == files
        tree = snap.path
    # a warm refresh after one small file changed downloads about its bundle
    (src / "d5/f0260.txt").write_bytes(b"changed")
    files["d5/f0260.txt"] = b"changed"
    info = cache.publish("db", src)
    m = remote.load_manifest("db", info.version)
    bundle = m.chunks[next(f for f in m.files if f.path == "d5/f0260.txt").chunks[0]]
    with cache.checkout("db") as snap:
        assert read_tree(snap.path) == files
        assert snap.stats.bytes_downloaded <= bundle.length + (64 << 10)  # + range slack
        new_tree = snap.path
    assert tree != new_tree
    # a consumer damages a bundled file and another's mode: the next checkout repairs both
    (new_tree / "d1/f0070.txt").write_bytes(b"consumer wrote this")
    with cache.checkout("db") as snap:
        assert read_tree(snap.path) == files


def test_local_copies_rebuild_bundles_from_their_members(tmp_path: Path) -> None:
    """With no intact stamps to copy by, a bundle another version holds is put together
    from its member files and verified: nothing is downloaded."""
    files = _files(300)
    remote = _file_store(tmp_path)
    v = remote.publish("db", write_tree(tmp_path / "src", files)).version
    first = remote.checkout("db", v, tmp_path / "one").path
    from chroma_snapshots.engine.transfer import LocalChunks

    local = LocalChunks()
    m = remote.load_manifest("db", v)
    local.add_tree(first, m)
    some = next(h for h, fs in bundles.members(m).items() if len(fs) > 3)
    assert some in local
    assert local.read(some) is not None
    # a member changed in place: the rebuilt bundle fails its hash and is not used
    (first / bundles.members(m)[some][1].path).write_bytes(b"!" * 7)
    assert local.read(some) is None
    local.close()


def test_inspection_names_a_damaged_bundle(tmp_path: Path) -> None:
    files = _files(200)
    cache = _cached(_file_store(tmp_path), tmp_path)
    cache.publish("db", write_tree(tmp_path / "src", files))
    with cache.checkout("db") as snap:
        tree = snap.path
    entry = inspect.entries(cache)[0]
    assert inspect.verify(cache, entry) == []
    (tree / "d2/f0110.txt").write_bytes(b"?" * len(files["d2/f0110.txt"]))
    problems = inspect.verify(cache, entry)
    assert any(p.startswith("d2/f0110.txt: content differs") for p in problems)
    assert len(problems) < 60  # only the files of that one bundle


def test_inspection_names_a_symlink_a_consumer_put_in_place_of_a_file(tmp_path: Path) -> None:
    big = os.urandom(50_000)  # chunked, not bundled: its bytes alone would verify
    cache = _cached(_file_store(tmp_path), tmp_path)
    cache.publish("db", write_tree(tmp_path / "src", {"big.bin": big, "small.txt": b"s"}))
    with cache.checkout("db") as snap:
        tree = snap.path
    twin = write_tree(tmp_path / "elsewhere", {"big.bin": big}) / "big.bin"
    (tree / "big.bin").unlink()
    (tree / "big.bin").symlink_to(twin)
    problems = inspect.verify(cache, inspect.entries(cache)[0])
    assert problems == ["big.bin: a symlink, not the file the cache wrote"]


def test_inspection_names_a_folder_a_consumer_swapped_for_a_link(tmp_path: Path) -> None:
    big = os.urandom(50_000)
    cache = _cached(_file_store(tmp_path), tmp_path)
    cache.publish("db", write_tree(tmp_path / "src", {"seg/big.bin": big, "small.txt": b"s"}))
    with cache.checkout("db") as snap:
        tree = snap.path
    twin = write_tree(tmp_path / "elsewhere", {"big.bin": big})
    (tree / "seg").rename(tmp_path / "moved")
    (tree / "seg").symlink_to(twin)
    problems = inspect.verify(cache, inspect.entries(cache)[0])
    assert problems == ["seg/big.bin: not the file the cache wrote (a link on its path)"]


def test_publish_plan_sees_bundles_as_publish_cuts_them(tmp_path: Path) -> None:
    files = _files(300)
    src = write_tree(tmp_path / "src", files)
    store = _file_store(tmp_path)
    store.publish("db", src)
    assert plan_publish(store, "db", src).clean
    (src / "d4/f0201.txt").write_bytes(b"other bytes")
    plan = plan_publish(store, "db", src)
    assert "d4/f0201.txt" in plan.changed
    assert len(plan.changed) < 60
    assert 1 <= plan.new_chunks <= 2


def test_the_stamp_index_trusts_a_bundle_only_when_every_member_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chroma_snapshots.engine import stampindex

    monkeypatch.setattr(stampindex, "default_dir", lambda: tmp_path / "stamps")
    monkeypatch.setattr(stampindex, "RACY_NS", -(10**10))
    reads: list[str] = []
    real = bundles.read_exact

    def counting(f: SourceFile, folders: SourceFolders) -> bytes:
        reads.append(f.relpath)
        return real(f, folders)

    monkeypatch.setattr(bundles, "read_exact", counting)
    src = write_tree(tmp_path / "src", _files(600))
    store = _file_store(tmp_path)
    v1 = store.publish("db", src).version
    reads.clear()
    assert store.publish("db", src).version == v1  # nothing changed: nothing read
    assert reads == []
    os.utime(src / "d7/f0351.txt", ns=(1, 1))  # a new stamp, the same bytes
    (src / "d7/f0352.txt").write_bytes(b"changed")
    v3 = store.publish("db", src).version
    m3 = _manifest(store, v3)
    read_bundles = {next(f for f in m3.files if f.path == p).chunks[0] for p in reads}
    assert {"d7/f0351.txt", "d7/f0352.txt"} <= set(reads)
    assert len(read_bundles) <= 2
    full = _file_store(tmp_path / "full")  # the same tree, every file read
    m_full = _manifest(full, full.publish("db", src, stamps=False).version)
    assert m_full.files == m3.files


# Hostile manifests: slices must lie inside their chunks, and only layout 2 has them.


def _bundled() -> Manifest:
    bundle = Chunk("a" * 64, "b" * 64, 0, 300, 300)
    big = Chunk("c" * 64, "b" * 64, 300, CS, CS)
    tail = Chunk("d" * 64, "b" * 64, 300 + CS, 100, 100)
    files = (
        FileEntry("x", 100, 0o644, (bundle.hash,), 0),
        FileEntry("y", 200, 0o644, (bundle.hash,), 100),
        FileEntry("z", CS + 100, 0o644, (big.hash, tail.hash), 0),
    )
    return Manifest("db", T0, CS, files, {c.hash: c for c in (bundle, big, tail)})


def _with(m: Manifest, path: str, **changes: object) -> Manifest:
    files = tuple(dataclasses.replace(f, **changes) if f.path == path else f for f in m.files)  # type: ignore[arg-type]
    return dataclasses.replace(m, files=files)


def test_a_bundled_manifest_round_trips() -> None:
    m = _bundled()
    got = manifest_v2.loads(manifest_v2.encode(m))
    assert got == m
    assert [f.at for f in got.files] == [0, 100, 0]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: _with(m, "y", at=101), "not inside"),  # a slice past the chunk's end
        (lambda m: _with(m, "y", at=10**9), "not inside"),  # far past it
        (lambda m: _with(m, "x", size=301), "not inside"),  # longer than the chunk
    ],
)
def test_slices_outside_their_chunk_are_refused(
    change: Callable[[Manifest], Manifest], match: str
) -> None:
    with pytest.raises(IntegrityError, match=match):
        manifest_v2.loads(manifest_v2.encode(change(_bundled())))


def test_a_start_on_a_file_of_several_chunks_is_refused() -> None:
    # layout 2 stores no start for such a file: only a Manifest built in memory has one
    with pytest.raises(IntegrityError, match="cannot start"):
        _with(_bundled(), "z", at=5).validate()
    with pytest.raises(IntegrityError, match="chunks for"):
        _with(_bundled(), "x", chunks=(), at=0).validate()  # a file of bytes needs a chunk


def test_overlapping_slices_are_valid() -> None:
    m = _with(_bundled(), "y", at=50)  # overlaps x: both are verified bytes of one chunk
    assert manifest_v2.loads(manifest_v2.encode(m)).files[1].at == 50


def _relabelled(data: bytes, layout: bytes) -> bytes:
    body = manifest_v2.decompress(data).replace(b'"layout":2', layout)
    comp = zstandard.ZstdCompressor(write_content_size=True).compress(body)
    return manifest_v2.MAGIC + comp


def test_slices_are_refused_outside_layout_2() -> None:
    data = manifest_v2.encode(_bundled())
    with pytest.raises(IntegrityError):
        manifest_v2.loads(_relabelled(data, b'"layout":1'))
    with pytest.raises(IntegrityError):  # format 1 neither writes nor reads them
        Manifest.from_json(_with(_bundled(), "y", at=0).to_json())
    with pytest.raises(InvalidInputError):
        _bundled().to_json()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_layout_2_bytes_are_refused_or_valid(data: st.DataObject) -> None:
    body = bytearray(manifest_v2.decompress(manifest_v2.encode(_bundled())))
    at = data.draw(st.integers(0, len(body) - 1))
    if data.draw(st.booleans()):
        body = body[:at]
    else:
        body[at] ^= 1 << data.draw(st.integers(0, 7))
    comp = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(body))
    try:
        got = manifest_v2.loads(manifest_v2.MAGIC + comp)
    except IntegrityError:
        return
    for f in got.files:  # what is accepted keeps every slice inside its chunk
        if f.chunks:
            assert f.at + min(f.size, CS) <= got.chunks[f.chunks[0]].size
    assert manifest_v2.loads(manifest_v2.encode(got)) == got


@pytest.mark.parametrize(
    "text",
    [
        "26-12-02T00:00:00.000000Z",  # year 26 as C's strftime wrote it
        "2026-1-02T00:00:00.000000Z",
        "2026-12-02T0:00:00.000000Z",
        "2026-12-02T00:00:00.12Z",
    ],
)
def test_a_timestamp_not_as_the_library_writes_it_is_refused(text: str) -> None:
    with pytest.raises(IntegrityError, match="bad timestamp"):
        parse_time(text, "created_at")


@pytest.mark.parametrize("year", [1, 26, 999, 2026, 9999])
def test_every_timestamp_accepted_is_written_back_the_same(year: int) -> None:
    """A bit flipped in a manifest turned 2026 into 0026: it was accepted, then written as
    ``26-12-02...``, which no reader took back (found by the damage test above)."""
    m = dataclasses.replace(_bundled(), created_at=datetime(year, 12, 2, 5, tzinfo=timezone.utc))
    text = format_time(m.created_at)
    assert text == f"{year:04d}-12-02T05:00:00.000000Z"
    assert parse_time(text, "created_at") == m.created_at
    assert manifest_v2.loads(manifest_v2.encode(m)) == m


# A stored store of layouts 1 and 2 (tests/fixtures/make_v2_layout2_store.py): what this
# code wrote must stay readable, whatever later code writes.
LAYOUT12 = Path(__file__).parent / "fixtures" / "v2_layout12_store"


def layout12_sources(root: Path) -> None:
    """The fixture's trees, as v0, v1, v2 under ``root``."""
    rng = random.Random(12)
    big = bytearray(rng.randbytes(3 * 4096 + 100))
    small = {f"conf/f{i:02d}.json": b'{"n": %d}\n' % i * (i % 5 + 1) for i in range(40)}
    trees = [{"seg/data.bin": bytes(big)}]
    for k in range(3):
        big[k * 4096 + 7] ^= 0xFF
    trees.append({"seg/data.bin": bytes(big), **small, "conf/empty.txt": b""})
    trees.append({**trees[1], "conf/f07.json": b'{"n": "seven"}\n'})
    for i, files in enumerate(trees):
        write_tree(root / f"v{i}", files)


def test_layout_1_and_2_fixture_store_is_readable(tmp_path: Path) -> None:
    import shutil

    root = shutil.copytree(LAYOUT12, tmp_path / "store")
    store = RemoteStore(FileBackend(str(root)), chunk_size=4096)
    layout12_sources(tmp_path / "src")
    versions = sorted(p.name.removesuffix(".json") for p in (root / "db" / "manifests").iterdir()
                      if p.name.endswith(".json"))  # fmt: skip
    assert len(versions) == 3
    layouts = []
    for i, version in enumerate(versions):
        m = store.load_manifest("db", version)
        layouts.append(b'"layout":2' in manifest_v2.decompress(manifest_v2.dumps(m)))
        out = store.checkout("db", version, tmp_path / f"out{i}")
        assert read_tree(out.path) == read_tree(tmp_path / "src" / f"v{i}")
        assert store.verify("db", version).ok
    assert layouts == [False, True, True]
    m1, m2 = (store.load_manifest("db", v) for v in versions[1:])
    assert any(c.base is not None for c in m1.chunks.values())  # the large file's deltas
    assert len(set(m2.chunks) - set(m1.chunks)) == 1  # one small file: one bundle


def _twin_folders(tmp_path: Path) -> tuple[Path, str]:
    """a/ and b/ hold the same small files: their bundles are one chunk, and each file of
    b/ has a twin in a/ at the same place in it."""
    cs = 16384

    def ends(path: str, size: int) -> bool:
        return bundles._ends_bundle(path, size, cs // 64)

    name = next(
        f"m{i}" for i in range(1000) if not ends(f"a/m{i}", 100) and not ends(f"b/m{i}", 100)
    )
    files: dict[str, bytes] = {}
    for d in "ab":
        files |= {f"{d}/0": os.urandom(256), f"{d}/{name}": b"M" * 100, f"{d}/z": b"Z" * 256}
    return write_tree(tmp_path / "src", files), f"b/{name}"


@pytest.mark.parametrize("damage", ["overwrite", "delete", "truncate"])
@pytest.mark.parametrize("patch", [True, False])
def test_a_damaged_file_whose_twin_covers_its_bundle_is_still_repaired(
    tmp_path: Path, damage: str, patch: bool
) -> None:
    """Putting a bundle together from the tree may skip a file another member covers (its
    twin in a/): repair, patching and ``cache verify`` check that file's own bytes too."""
    src, victim = _twin_folders(tmp_path)
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=16384)
    v1 = remote.publish("db", src).version
    cache = CachedStore(remote, tmp_path / "cache", patch_in_place=patch)
    with cache.checkout("db", v1) as snap:
        path = snap.path / victim
    if damage == "overwrite":
        path.write_bytes(b"X" * 100)
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"")
    (entry,) = inspect.entries(cache)
    assert any(victim in p for p in inspect.verify(cache, entry))
    if patch:  # a refresh to a new version patches the damaged tree
        (src / "c.txt").write_bytes(b"new")
        v2 = remote.publish("db", src).version
    with cache.checkout("db", v2 if patch else v1) as snap:
        assert read_tree(snap.path) == read_tree(src)
