"""Conformance test classes: subclass with a ``backend`` or ``store`` fixture.

Every backend and every SnapshotStore must pass the same tests, so a new
implementation is correct exactly when its subclass is green.
"""

from __future__ import annotations

import os
import random
from datetime import datetime, timezone
from pathlib import Path

import pytest

from chroma_snapshots.backends.base import Backend, ObjectMeta, PutMode
from chroma_snapshots.engine.keys import pack_key
from chroma_snapshots.engine.models import RefValue
from chroma_snapshots.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
)
from chroma_snapshots.stores.base import ANY, SnapshotStore
from chroma_snapshots.stores.delegating import DelegatingStore
from chroma_snapshots.stores.remote import RemoteStore
from chroma_snapshots.testing.races import race, raise_unexpected
from chroma_snapshots.testing.trees import read_tree, write_tree

__all__ = [
    "BackendTests",
    "SnapshotStoreTests",
    "race",
    "raise_unexpected",
    "read_tree",
    "write_tree",
]


class BackendTests:
    """The behaviour every :class:`Backend` must have. Provide a ``backend`` fixture."""

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError("subclass BackendTests and provide a backend fixture")

    # Out of band: the storage itself, not through the backend (the files on disk, the
    # bucket through another client), so a bug symmetric in put and get cannot hide.

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` without going through ``backend``."""
        raise NotImplementedError(f"{type(self).__name__} must implement raw_put")

    def raw_get(self, backend: Backend, key: str) -> bytes:
        """The bytes stored at ``key``, read without going through ``backend``."""
        raise NotImplementedError(f"{type(self).__name__} must implement raw_get")

    def test_what_is_put_is_stored(self, backend: Backend) -> None:
        data = bytes(range(256)) * 40
        backend.put("oob/put.bin", data)
        assert self.raw_get(backend, "oob/put.bin") == data
        backend.put("oob/put.bin", b"second", mode=PutMode.OVERWRITE)
        assert self.raw_get(backend, "oob/put.bin") == b"second"

    def test_what_is_stored_is_got(self, backend: Backend) -> None:
        data = os.urandom(10_000)
        self.raw_put(backend, "oob/raw.bin", data)
        assert backend.get("oob/raw.bin").data == data
        assert backend.get("oob/raw.bin", byte_range=(100, 200)).data == data[100:200]
        assert backend.head("oob/raw.bin").size == len(data)
        assert [m.key for m in backend.list("oob/")] == ["oob/raw.bin"]

    def test_put_get_head(self, backend: Backend) -> None:
        meta = backend.put("a/b.bin", b"hello world")
        got = backend.get("a/b.bin")
        assert got.data == b"hello world"
        assert got.meta.size == 11
        assert got.meta.etag == meta.etag == backend.head("a/b.bin").etag

    def test_byte_range(self, backend: Backend) -> None:
        backend.put("r", bytes(range(100)))
        assert backend.get("r", byte_range=(10, 20)).data == bytes(range(10, 20))
        assert backend.get("r", byte_range=(95, 100)).data == bytes(range(95, 100))

    def test_missing(self, backend: Backend) -> None:
        with pytest.raises(SnapshotNotFoundError):
            backend.get("nope/x")
        with pytest.raises(FileNotFoundError):  # the builtin it also is
            backend.head("nope/x")
        assert not backend.exists("nope/x")
        backend.delete("nope/x")  # deleting a missing key is fine

    def test_overwrite_changes_etag(self, backend: Backend) -> None:
        first = backend.put("k", b"one")
        second = backend.put("k", b"two")
        assert backend.get("k").data == b"two"
        assert first.etag != second.etag

    def test_create_refuses_existing(self, backend: Backend) -> None:
        backend.put("c", b"first", mode=PutMode.CREATE)
        with pytest.raises(ConflictError):
            backend.put("c", b"second", mode=PutMode.CREATE)
        assert backend.get("c").data == b"first"

    def test_update_is_compare_and_swap(self, backend: Backend) -> None:
        etag = backend.put("u", b"v1").etag
        new = backend.put("u", b"v2", mode=PutMode.update(etag))
        with pytest.raises(ConflictError):
            backend.put("u", b"v3", mode=PutMode.update(etag))  # stale etag
        assert backend.get("u").data == b"v2"
        backend.put("u", b"v3", mode=PutMode.update(backend.get("u").meta.etag))
        assert backend.get("u").data == b"v3"
        assert new.etag != etag

    def test_update_missing_conflicts(self, backend: Backend) -> None:
        with pytest.raises(ConflictError):
            backend.put("absent", b"x", mode=PutMode.update("0123abcd"))
        assert not backend.exists("absent")

    def test_list_and_delete(self, backend: Backend) -> None:
        for k in ("n/packs/aa/1", "n/packs/ab/2", "n/refs/latest", "m/refs/latest"):
            backend.put(k, k.encode())
        assert sorted(m.key for m in backend.list("n/")) == [
            "n/packs/aa/1",
            "n/packs/ab/2",
            "n/refs/latest",
        ]
        assert sorted(m.key for m in backend.list("n/packs/a")) == ["n/packs/aa/1", "n/packs/ab/2"]
        assert backend.list_dirs("") == ["m", "n"]
        assert {m.key: m.size for m in backend.list("m/")} == {"m/refs/latest": 13}
        backend.delete("n/packs/aa/1")
        assert sorted(m.key for m in backend.list("n/packs/")) == ["n/packs/ab/2"]

    def test_delete_many(self, backend: Backend) -> None:
        keys = [f"d/k{i}" for i in range(5)]
        for k in keys:
            backend.put(k, b"x")
        backend.delete_many([*keys[:3], "d/never-existed"])
        assert sorted(m.key for m in backend.list("d/")) == keys[3:]

    @pytest.mark.parametrize(
        "key", ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "a/.hidden", "x\x00"]
    )
    def test_rejects_unsafe_keys(self, backend: Backend, key: str) -> None:
        with pytest.raises(InvalidInputError):
            backend.put(key, b"x")

    @pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "x\x00"])
    def test_every_operation_rejects_unsafe_keys(self, backend: Backend, key: str) -> None:
        for op in (backend.get, backend.head, backend.delete):
            with pytest.raises(InvalidInputError):
                op(key)
        with pytest.raises(InvalidInputError):
            backend.get_into(key, (0, 1), memoryview(bytearray(1)))

    def test_get_into_reads_exactly_the_range(self, backend: Backend) -> None:
        data = os.urandom(300_000)
        backend.put("gi", data)
        for start, end in ((0, 300_000), (1, 299_999), (65_536, 131_072), (299_990, 300_000)):
            buf = bytearray(end - start)
            assert backend.get_into("gi", (start, end), memoryview(buf)) == end - start
            assert bytes(buf) == data[start:end]
        roomy = bytearray(1000)  # a buffer larger than the range gets the range only
        assert backend.get_into("gi", (10, 20), memoryview(roomy)) == 10
        assert bytes(roomy[:10]) == data[10:20]
        assert roomy[10:] == bytes(990)

    def test_a_range_past_the_end_is_damage(self, backend: Backend) -> None:
        backend.put("short", b"0123456789")
        with pytest.raises(IntegrityError):
            backend.get("short", byte_range=(10, 20))
        with pytest.raises(IntegrityError):
            backend.get_into("short", (50, 60), memoryview(bytearray(10)))
        assert backend.get("short", byte_range=(5, 20)).data == b"56789"  # S3 trims the end

    def test_a_large_object_round_trips(self, backend: Backend) -> None:
        data = os.urandom(1 << 20) * 12  # 12 MiB: multipart on S3
        backend.put("big/obj", data, mode=PutMode.CREATE)
        assert backend.head("big/obj").size == len(data)
        assert backend.get("big/obj").data == data
        cut = (5 << 20) - 7, (7 << 20) + 3  # across a part boundary
        assert backend.get("big/obj", byte_range=cut).data == data[cut[0] : cut[1]]

    @pytest.mark.parametrize("round_", range(4))
    def test_concurrent_create_has_one_winner(self, backend: Backend, round_: int) -> None:
        key = f"race/{round_}"
        outcomes = race(6, lambda i: backend.put(key, str(i).encode(), mode=PutMode.CREATE))
        raise_unexpected(outcomes, (ConflictError,))  # any other error fails the test
        wins = [i for i, o in enumerate(outcomes) if isinstance(o, ObjectMeta)]
        assert len(wins) == 1
        assert sum(isinstance(o, ConflictError) for o in outcomes) == 5
        assert backend.get(key).data == str(wins[0]).encode()

    def test_concurrent_updates_lose_nothing(self, backend: Backend) -> None:
        backend.put("counter", b"0")

        def increment(_: int) -> None:
            for _ in range(5):
                for _attempt in range(10_000):  # a backend whose CAS never succeeds fails
                    try:
                        # a read may meet the object changing too often (fsspec's stable
                        # read gives up after 8 looks): the documented ConflictError
                        got = backend.get("counter")
                        backend.put(
                            "counter",
                            str(int(got.data) + 1).encode(),
                            mode=PutMode.update(got.meta.etag),
                        )
                        break
                    except ConflictError:
                        continue
                else:
                    raise AssertionError("compare-and-swap never succeeded in 10,000 tries")

        raise_unexpected(race(4, increment))  # no thread may fail
        assert backend.get("counter").data == b"20"


class SnapshotStoreTests:
    """The behaviour every :class:`SnapshotStore` must have. Provide a ``store`` fixture
    (a RemoteStore with a small chunk size, e.g. 4 KiB, so small trees span many chunks)."""

    @pytest.fixture
    def store(self) -> SnapshotStore:
        raise NotImplementedError("subclass SnapshotStoreTests and provide a store fixture")

    def remote_of(self, store: SnapshotStore) -> RemoteStore:
        """The RemoteStore that holds ``store``'s objects, found through wrappers' ``inner``
        (the damage tests edit objects there); override for a store built otherwise."""
        while isinstance(store, DelegatingStore):
            store = store.inner
        assert isinstance(store, RemoteStore), f"override remote_of for {type(store).__name__}"
        return store

    def remotes_of(self, store: SnapshotStore) -> list[RemoteStore]:
        """Every RemoteStore ``store`` may serve from (the damage tests damage each one);
        override for a store that fails over between several."""
        return [self.remote_of(store)]

    def _tree(self, tmp_path: Path) -> Path:
        rng = random.Random(7)
        return write_tree(
            tmp_path / "src",
            {
                "chroma.sqlite3": rng.randbytes(50_000),
                "seg/data_level0.bin": bytes(20_000),
                "seg/header.bin": b"h" * 100,
                "seg/empty": b"",
            },
        )

    def test_round_trip(self, store: SnapshotStore, tmp_path: Path) -> None:
        src = self._tree(tmp_path)
        os.chmod(src / "seg/header.bin", 0o600)
        info = store.publish("db", src, message="first")
        with store.checkout("db", dest=tmp_path / "out") as snap:
            assert read_tree(snap.path) == read_tree(src)
            assert (snap.path / "seg/header.bin").stat().st_mode & 0o777 == 0o600
            assert snap.info.version == info.version
        assert store.resolve("db").version == info.version
        assert store.resolve("db", info.version).message == "first"
        assert list(store.names()) == ["db"]

    def test_unchanged_publish_uploads_no_packs(self, store: SnapshotStore, tmp_path: Path) -> None:
        src = self._tree(tmp_path)
        first = store.publish("db", src)
        again = store.publish("db", src)  # no change: no new version, like git
        assert again.version == first.version == store.resolve("db").version
        assert again.stats.bytes_uploaded == 0
        second = store.publish("db", src, allow_empty=True)
        assert second.parent == first.version
        assert second.stats.packs_transferred == 0
        assert second.stats.bytes_reused == first.total_size

    def test_small_change_uploads_one_chunk(self, store: SnapshotStore, tmp_path: Path) -> None:
        src = self._tree(tmp_path)
        store.publish("db", src)
        with open(src / "chroma.sqlite3", "r+b") as f:
            f.seek(8192)
            f.write(b"\xff" * 16)
        info = store.publish("db", src)
        assert info.stats.chunks_transferred == 1
        assert info.stats.packs_transferred == 1
        assert read_tree(store.checkout("db", dest=tmp_path / "o").path) == read_tree(src)

    def test_stale_expected_conflicts(self, store: SnapshotStore, tmp_path: Path) -> None:
        src = self._tree(tmp_path)
        base = store.publish("db", src, expected=None)
        winner = store.publish("db", src, expected=base.version, allow_empty=True)
        with pytest.raises(ConflictError):
            store.publish("db", src, expected=base.version)
        with pytest.raises(ConflictError):
            store.publish("db", src, expected=None)
        assert store.resolve("db").version == winner.version
        forced = store.publish("db", src, expected=ANY, allow_empty=True)
        assert store.resolve("db").version == forced.version

    def test_tags_and_rollback(self, store: SnapshotStore, tmp_path: Path) -> None:
        src = self._tree(tmp_path)
        v1 = store.publish("db", src).version
        (src / "new.txt").write_bytes(b"new")
        v2 = store.publish("db", src).version
        assert [v.version for v in store.versions("db")] == [v2, v1]
        store.set_ref("db", "stable", v1, expected=None)
        store.set_ref("db", "latest", v1, expected=v2)  # rollback
        with pytest.raises(ConflictError):
            store.set_ref("db", "latest", v2, expected=v2)
        assert store.refs("db") == {"latest": v1, "stable": v1}
        assert "new.txt" not in read_tree(store.checkout("db", dest=tmp_path / "o").path)
        with pytest.raises(SnapshotNotFoundError):
            store.set_ref("db", "x", "20200101T000000000000Z-000000000000", expected=None)

    def test_missing_and_bad_names(self, store: SnapshotStore, tmp_path: Path) -> None:
        with pytest.raises(SnapshotNotFoundError):
            store.resolve("nothing")
        with pytest.raises(SnapshotNotFoundError):
            store.checkout("nothing", dest=tmp_path / "o")
        assert not (tmp_path / "o").exists()
        for bad in ("../x", "a/b", "", ".hidden"):
            with pytest.raises(InvalidInputError):
                store.publish(bad, self._tree(tmp_path))

    def test_checkout_refuses_non_empty_dest(self, store: SnapshotStore, tmp_path: Path) -> None:
        store.publish("db", self._tree(tmp_path))
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "keep").write_bytes(b"mine")
        with pytest.raises(InvalidInputError):
            store.checkout("db", dest=tmp_path / "busy")
        assert (tmp_path / "busy" / "keep").read_bytes() == b"mine"

    def test_verify_detects_damage(self, store: SnapshotStore, tmp_path: Path) -> None:
        info = store.publish("db", self._tree(tmp_path))
        assert store.verify("db", info.version).ok
        for remote in self.remotes_of(store):
            pack = sorted(remote.load_manifest("db", info.version).packs)[0]
            data = bytearray(remote.backend.get(pack_key("db", pack)).data)
            data[len(data) // 2] ^= 0x01
            remote.backend.put(pack_key("db", pack), bytes(data))
        report = store.verify("db", info.version)
        assert not report.ok
        assert any("mismatch" in p for p in report.problems)
        with pytest.raises(IntegrityError):
            store.checkout("db", dest=tmp_path / "o")
        assert not (tmp_path / "o").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []

    def test_prune_keeps_what_is_referenced(self, store: SnapshotStore, tmp_path: Path) -> None:
        src = self._tree(tmp_path)
        versions = []
        for i in range(4):
            (src / "chroma.sqlite3").write_bytes(os.urandom(30_000) + bytes([i]))
            versions.append(store.publish("db", src).version)
        store.set_ref("db", "stable", versions[0], expected=None)
        assert store.prune("db", keep_last=1, min_age=3600).deleted_versions == ()  # all too young
        dry = store.prune("db", keep_last=1, min_age=0, dry_run=True)
        assert set(dry.deleted_versions) == {versions[1], versions[2]}
        report = store.prune("db", keep_last=1, min_age=0)
        assert report.deleted_packs
        assert report.freed_bytes > 0
        assert [v.version for v in store.versions("db")] == [versions[3], versions[0]]
        for v in (versions[3], versions[0]):
            assert store.verify("db", v).ok
        assert read_tree(store.checkout("db", dest=tmp_path / "o").path) == read_tree(src)

    def test_refs_are_validated(self, store: SnapshotStore, tmp_path: Path) -> None:
        store.publish("db", self._tree(tmp_path))
        backends = [r.backend for r in self.remotes_of(store)]
        for backend in backends:
            backend.put("db/refs/latest", b'{"version": "../../etc"}')
        with pytest.raises(IntegrityError):
            store.resolve("db")
        # above the generation the publish gave it (the time in microseconds)
        good = RefValue("20200101T000000000000Z-000000000000", 1 << 61, datetime.now(timezone.utc))
        for backend in backends:
            backend.put("db/refs/latest", good.to_json())
        with pytest.raises(SnapshotNotFoundError):
            store.resolve("db")
