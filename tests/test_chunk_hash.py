"""Chunks named by BLAKE3 (format 2 layout 4, 60 hex digits): what a new store writes. An
id's length says its hash, so every id is checked with the hash that made it; a store keeps
its parent's hash unless told otherwise, and a switch moves every chunk once, mixing
nothing (no delta across hashes, no stamp of one hash trusted for the other)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from functools import partial
from pathlib import Path

import pytest
from blake3 import blake3
from cli_inprocess import Run

from chroma_snapshots import CachedStore, IntegrityError, RemoteStore, open_backend
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.cli.plan import describe_plan, plan_publish
from chroma_snapshots.config import ENV_CHUNK_HASH, StoreConfig
from chroma_snapshots.engine import manifest_v2
from chroma_snapshots.engine.chunkids import BLAKE3, chunk_ok, history, publish_scheme
from chroma_snapshots.engine.models import Manifest, is_link_key
from chroma_snapshots.errors import (
    ConfigError,
    InvalidInputError,
    SnapshotNotFoundError,
    StorageTimeoutError,
)
from chroma_snapshots.testing.conformance import read_tree, write_tree

CS = 4096


def _tree(root: Path, seed: int = 0) -> Path:
    rng = os.urandom
    return write_tree(
        root,
        {
            "big.bin": rng(20 * CS + 7),
            "mid.bin": rng(3 * CS),
            **{f"small/{i:03d}": rng(50 + i + seed) for i in range(30)},
        },
    )


def _widths(m: Manifest) -> set[int]:
    return {len(h) for h in m.chunks if not is_link_key(h)}


def _file_store(root: Path, **kw: object) -> RemoteStore:
    return RemoteStore(FileBackend(str(root)), chunk_size=CS, **kw)  # type: ignore[arg-type]


def test_a_new_store_names_chunks_by_blake3(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    store = RemoteStore(open_backend(f"memory://h-{uuid.uuid4().hex}"), chunk_size=CS)
    v = store.publish("db", src).version
    m = store.load_manifest("db", v)
    assert _widths(m) == {60}
    assert b'"layout":4' in manifest_v2.decompress(manifest_v2.dumps(m))
    big = (src / "big.bin").read_bytes()
    (entry,) = [f for f in m.files if f.path == "big.bin"]
    for i, h in enumerate(entry.chunks):  # each id is the BLAKE3 of its bytes, cut to 240 bits
        assert h == blake3(big[i * CS : (i + 1) * CS]).hexdigest()[:60]
    assert read_tree(store.checkout("db", v, tmp_path / "out").path) == read_tree(src)
    assert store.verify("db", v).ok


def test_each_id_is_checked_with_the_hash_that_made_it() -> None:
    raw = os.urandom(5000)
    b3, sha = blake3(raw).hexdigest(), hashlib.sha256(raw).hexdigest()
    assert chunk_ok(raw, b3[:60])
    assert chunk_ok(raw, sha)
    assert chunk_ok(raw, sha[:56])
    # a sha256 cut to a BLAKE3 id's length, or the other way round, is never accepted
    assert not chunk_ok(raw, sha[:60])
    assert not chunk_ok(raw, b3[:56])
    assert not chunk_ok(raw, b3)
    flipped = bytes([raw[0] ^ 1]) + raw[1:]
    assert not chunk_ok(flipped, b3[:60])


@pytest.mark.parametrize(("chunk_hash", "width"), [("blake3", 60), ("sha256", 56)])
def test_a_flipped_byte_is_refused_whatever_the_hash(
    tmp_path: Path, chunk_hash: str, width: int
) -> None:
    root = tmp_path / "store"
    store = _file_store(root, chunk_hash=chunk_hash)
    v = store.publish("db", write_tree(tmp_path / "src", {"a": os.urandom(2 * CS)})).version
    assert _widths(store.load_manifest("db", v)) == {width}
    (pack,) = [p for p in (root / "db" / "packs").rglob("*") if p.is_file()]
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 1
    pack.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.checkout("db", v, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(IntegrityError):
        CachedStore(store, tmp_path / "cache").checkout("db", v, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert not store.verify("db", v).ok


def test_a_store_keeps_its_hash_unless_told(tmp_path: Path) -> None:
    """sha256 versions stay sha256 (an unchanged folder makes no version, a change moves
    only itself); chunk_hash="blake3" moves every chunk once, then BLAKE3 is kept; a cache
    holding the sha256 version serves the BLAKE3 one right."""
    root, src = tmp_path / "store", _tree(tmp_path / "src")
    v1 = _file_store(root, chunk_hash="sha256").publish("db", src).version
    store = _file_store(root)
    assert store.publish("db", src).version == v1
    cache = CachedStore(store, tmp_path / "cache")
    with cache.checkout("db", v1):
        pass
    (src / "mid.bin").write_bytes(os.urandom(3 * CS))
    v2 = store.publish("db", src)
    assert _widths(store.load_manifest("db", v2.version)) == {56}
    assert v2.stats.chunks_transferred == 3
    (src / "big.bin").write_bytes(os.urandom(CS) + (src / "big.bin").read_bytes()[CS:])
    v3 = _file_store(root, chunk_hash="blake3").publish("db", src)
    m3 = store.load_manifest("db", v3.version)
    assert _widths(m3) == {60}
    assert v3.stats.chunks_transferred == len(m3.chunks)  # nothing of sha256 reused
    tree3 = read_tree(src)
    (src / "small" / "000").write_bytes(b"changed")
    v4 = store.publish("db", src)
    assert _widths(store.load_manifest("db", v4.version)) == {60}
    assert v4.stats.chunks_transferred == 1  # the one bundle
    for v, tree in ((v3.version, tree3), (v4.version, read_tree(src))):
        with cache.checkout("db", v) as snap:
            assert read_tree(snap.path) == tree
        assert store.verify("db", v).ok


def test_the_hash_is_read_through_empty_versions_and_sha256_when_unknown(tmp_path: Path) -> None:
    """A parent with no chunks says no hash: the nearest version back that has some does
    (sha256 stays sha256, BLAKE3 stays BLAKE3); a parent that cannot be read says nothing
    either, and the publish takes sha256, which readers older than BLAKE3 ids know."""
    src, empty = _tree(tmp_path / "src"), tmp_path / "empty"
    empty.mkdir()
    for chunk_hash, width in (("sha256", 56), ("blake3", 60)):
        root = tmp_path / f"store-{chunk_hash}"
        _file_store(root, chunk_hash=chunk_hash).publish("db", src)
        store = _file_store(root)
        store.publish("db", empty)
        store.publish("db", write_tree(tmp_path / f"none-{chunk_hash}", {"zero": b""}))
        v = store.publish("db", src).version
        assert _widths(store.load_manifest("db", v)) == {width}, chunk_hash
        assert plan_publish(store, "db", src).chunk_hash == ("sha256" if width == 56 else "blake3")
    root = tmp_path / "store-damaged"
    store = _file_store(root, chunk_hash="blake3")
    v1 = store.publish("db", src).version
    (manifest,) = (root / "db" / "manifests").iterdir()
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 1
    manifest.write_bytes(bytes(data))
    (src / "mid.bin").write_bytes(os.urandom(3 * CS))
    v2 = _file_store(root).publish("db", src).version
    assert v2 != v1
    assert _widths(store.load_manifest("db", v2)) == {56}
    assert read_tree(store.checkout("db", v2, tmp_path / "out").path) == read_tree(src)


def test_no_delta_crosses_hashes(tmp_path: Path) -> None:
    """With the parent's copy at hand, a small change is stored as a delta on the parent's
    chunk in the parent's hash; a publish that switches hash stores keyframes instead (a
    chain holds ids of one hash), and its version reads back right."""
    big = os.urandom(16 * CS)
    old = write_tree(tmp_path / "old", {"f.bin": big})
    changed = bytearray(big)
    for i in range(0, len(changed), CS):
        changed[i + 100] ^= 0xFF  # every chunk differs by one byte
    new = write_tree(tmp_path / "new", {"f.bin": bytes(changed)})
    for chunk_hash, deltas in (("sha256", True), ("blake3", False)):
        root = tmp_path / f"store-{chunk_hash}"
        _file_store(root, chunk_hash="sha256").publish("db", old)
        store = _file_store(root, chunk_hash=chunk_hash)
        v = store.publish("db", new, parent_dir=old).version
        m = store.load_manifest("db", v)
        assert any(c.base is not None for c in m.chunks.values()) is deltas, chunk_hash
        assert read_tree(store.checkout("db", v, tmp_path / f"out-{chunk_hash}").path) == {
            "f.bin": bytes(changed)
        }
        assert store.verify("db", v).ok


def test_stamps_of_one_hash_are_not_trusted_for_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    root, src = tmp_path / "store", _tree(tmp_path / "src")
    _file_store(root, chunk_hash="sha256").publish("db", src)
    store = _file_store(root, chunk_hash="blake3")
    info = store.publish("db", src)  # every file hashed again: ids of the index are sha256
    m = store.load_manifest("db", info.version)
    assert _widths(m) == {60}
    assert store.verify("db", info.version).ok
    assert store.publish("db", src).version == info.version  # now its own index: unchanged


def test_a_dry_run_plans_with_the_hash_publish_uses(tmp_path: Path) -> None:
    """Across a switch of hash, files are compared by content (the local bytes hashed the
    latest's way too): none is listed as changed, yet every chunk would be uploaded, and
    the plan says why; a real change is listed alone."""
    root, src = tmp_path / "store", _tree(tmp_path / "src")
    _file_store(root, chunk_hash="sha256").publish("db", src)
    keep = plan_publish(_file_store(root), "db", src)
    switch = plan_publish(_file_store(root, chunk_hash="blake3"), "db", src)
    assert keep.clean
    assert keep.new_bytes == 0
    assert (keep.chunk_hash, keep.latest_chunk_hash) == ("sha256", "sha256")
    assert not switch.clean
    assert switch.new_bytes == switch.total_bytes > 0
    assert (switch.added, switch.removed, switch.changed) == ([], [], [])
    assert (switch.chunk_hash, switch.latest_chunk_hash) == ("blake3", "sha256")
    assert "every chunk is uploaded again" in describe_plan(switch, str(src))
    (src / "mid.bin").write_bytes(os.urandom(3 * CS))
    (src / "small" / "007").write_bytes(b"x" * 57)  # the same size, other bytes
    moved = plan_publish(_file_store(root, chunk_hash="blake3"), "db", src)
    assert "mid.bin" in moved.changed
    assert "small/007" in moved.changed
    assert "big.bin" not in moved.changed


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"chunk_hash": "md5"}, "chunk_hash must be"),
        ({"chunk_hash": "BLAKE3"}, "chunk_hash must be"),
        ({"chunk_hash": "blake3", "manifest_format": 1}, "sha256 only"),
    ],
)
def test_a_wrong_chunk_hash_is_refused_at_opening(kw: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        RemoteStore(open_backend("memory://wrong"), **kw)  # type: ignore[arg-type]


def test_the_environment_names_the_hash() -> None:
    base = {"CHROMA_SNAPSHOTS_URL": "s3://b"}
    assert StoreConfig.from_env(base).chunk_hash is None
    assert StoreConfig.from_env({**base, ENV_CHUNK_HASH: " SHA256 "}).chunk_hash == "sha256"
    for bad in ("md5", "blake-3", "sha-256"):
        with pytest.raises(ConfigError, match=ENV_CHUNK_HASH):
            StoreConfig.from_env({**base, ENV_CHUNK_HASH: bad})
    with pytest.raises(ConfigError, match="chunk_hash"):
        StoreConfig(url="s3://b", chunk_hash="md5")


@pytest.mark.usefixtures("clean_env")
def test_the_cli_publishes_with_the_hash_the_environment_names(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _tree(tmp_path / "src")
    store = tmp_path / "store"
    for name, value, width in (("a", None, 60), ("b", "sha256", 56), ("c", "blake3", 60)):
        if value is None:
            monkeypatch.delenv(ENV_CHUNK_HASH, raising=False)
        else:
            monkeypatch.setenv(ENV_CHUNK_HASH, value)
        code, _, err = run("--store", str(store), "publish", name, str(src))
        assert code == 0, err
        s = _file_store(store)
        assert _widths(s.load_manifest(name, s.current_version(name)[0])) == {width}, name
    monkeypatch.setenv(ENV_CHUNK_HASH, "blake3")  # "b" is sha256: a switch moves it all
    code, out, err = run("--store", str(store), "publish", "b", str(src), "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["new_bytes"] == plan["total_bytes"] > 0
    monkeypatch.delenv(ENV_CHUNK_HASH)
    code, out, err = run("--store", str(store), "publish", "b", str(src), "--dry-run", "--json")
    assert json.loads(out)["new_bytes"] == 0
    monkeypatch.setenv(ENV_CHUNK_HASH, "md5")
    code, _, err = run("--store", str(store), "publish", "d", str(src))
    assert code == 2
    assert ENV_CHUNK_HASH in err
    assert not (store / "d").exists()


@pytest.mark.usefixtures("clean_env")
def test_diff_says_when_two_versions_are_of_different_hashes(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, store = _tree(tmp_path / "src"), str(tmp_path / "store")
    for value in ("sha256", "sha256", "blake3"):
        monkeypatch.setenv(ENV_CHUNK_HASH, value)
        (src / "mid.bin").write_bytes(os.urandom(3 * CS))
        assert run("--store", store, "publish", "db", str(src))[0] == 0
    versions = [v.version for v in _file_store(Path(store)).versions("db")]
    first, second, third = sorted(versions)
    code, out, _ = run("--store", store, "diff", "db", first, second, "--json")
    assert json.loads(out)["chunk_hashes"] == ["sha256", "sha256"]
    assert json.loads(out)["changed"] == ["mid.bin"]
    code, out, _ = run("--store", store, "diff", "db", second, third)
    assert code == 0
    assert "A names chunks by sha256, B by blake3" in out


def test_a_dry_run_through_a_fallback_plans_with_its_primary_s_hash(tmp_path: Path) -> None:
    """publish --dry-run with a fallback configured asks the store a publish writes to."""
    from chroma_snapshots.opening import source_for

    src = _tree(tmp_path / "src")
    main, spare = tmp_path / "main", tmp_path / "spare"
    first = StoreConfig(url=str(main), fallback_url=str(spare), chunk_hash="sha256")
    source_for(first, create=True).publish("db", src)  # to the pair's source of truth
    for chunk_hash, want in ((None, "sha256"), ("blake3", "blake3")):
        cfg = StoreConfig(url=str(main), fallback_url=str(spare), chunk_hash=chunk_hash)
        store = source_for(cfg, create=True)
        assert getattr(store, "primary", None) is not None  # a fallback pair, as configured
        plan = plan_publish(store, "db", src)
        assert plan.chunk_hash == want
        assert plan.latest_chunk_hash == "sha256"
        assert (plan.new_bytes == 0) is (want == "sha256")


def test_an_ancestor_pruned_or_damaged_mid_walk_ends_it_as_unknown(tmp_path: Path) -> None:
    """A prune (or damage) between reading the parent and walking past an empty one:
    the walk ends there, unknown, and the publish takes sha256 (never wrong bytes: at worst
    a full upload); a timeout is not swallowed."""
    src, empty = _tree(tmp_path / "src"), tmp_path / "empty"
    empty.mkdir()
    root = tmp_path / "store"
    store = _file_store(root, chunk_hash="blake3")
    store.publish("db", src)
    parent = store.publish("db", empty).version
    pm = store.load_manifest("db", parent)
    for error in (SnapshotNotFoundError("pruned"), IntegrityError("damaged")):

        def gone(version: str, error: Exception = error) -> Manifest:
            raise error

        assert list(history(pm, parent, gone)) == [pm.chunks, None]
        assert publish_scheme(None, 2, history(pm, parent, gone)).name == "sha256"
    assert (
        publish_scheme(None, 2, history(pm, parent, partial(store.load_manifest, "db"))) is BLAKE3
    )

    def hung(version: str) -> Manifest:
        raise StorageTimeoutError("hung")

    with pytest.raises(StorageTimeoutError):
        publish_scheme(None, 2, history(pm, parent, hung))
