"""Damaged or hostile stored data is detected before anything lands outside ``dest``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from chroma_snapshots import (
    IntegrityError,
    Manifest,
    RefValue,
    RemoteStore,
    SnapshotNotFoundError,
    VersionId,
    open_backend,
)
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine.keys import manifest_key, pack_key, ref_key
from chroma_snapshots.engine.validation import canonical_json, parse_time, utc_now
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import write_tree


@pytest.fixture
def store() -> RemoteStore:
    # format 1: these cases edit the manifest's JSON (test_format_v2 covers format 2)
    backend = open_backend(f"memory://i-{uuid.uuid4().hex}")
    return RemoteStore(backend, chunk_size=4096, pack_target=8192, manifest_format=1)


@pytest.fixture
def published(store: RemoteStore, tmp_path: Path) -> str:
    write_tree(tmp_path / "src", {"a.bin": bytes(range(256)) * 100, "d/b.txt": b"b" * 9000})
    return store.publish("db", tmp_path / "src").version


def _damage_pack(store: RemoteStore, version: str, how: str) -> None:
    pack = sorted(store.load_manifest("db", version).packs)[0]
    key = pack_key("db", pack)
    data = store.backend.get(key).data
    if how == "flip":
        store.backend.put(key, data[:10] + bytes([data[10] ^ 0x40]) + data[11:])
    elif how == "truncate":
        store.backend.put(key, data[: len(data) // 2])
    else:
        store.backend.delete(key)


def _nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_pack_fails_checkout(
    store: RemoteStore, published: str, tmp_path: Path, how: str
) -> None:
    _damage_pack(store, published, how)
    with pytest.raises(IntegrityError):
        store.checkout("db", dest=tmp_path / "out")
    _nothing_left(tmp_path)
    assert not store.verify("db", published).ok


def test_missing_pack_is_not_found(store: RemoteStore, published: str, tmp_path: Path) -> None:
    _damage_pack(store, published, "delete")
    with pytest.raises(SnapshotNotFoundError):
        store.checkout("db", dest=tmp_path / "out")
    _nothing_left(tmp_path)
    assert any("missing" in p for p in store.verify("db", published).problems)


def _plant_manifest(store: RemoteStore, version: str, edit: dict[str, object]) -> str:
    """Store an edited copy of a manifest under its own (correct) version id; point latest at it."""
    obj = json.loads(store.backend.get(manifest_key("db", version)).data)
    obj.update(edit)
    data = canonical_json(obj)
    new = str(VersionId.for_manifest(data, parse_time(obj["created_at"], "created_at")))
    store.backend.put(manifest_key("db", new), data)
    store.backend.put(ref_key("db", "latest"), RefValue(new, 99, utc_now()).to_json())
    return new


@pytest.mark.parametrize("path", ["../x", "/etc/x", "a/../../x", "a\\..\\x", "ok/./x", "a\x00b"])
def test_hostile_manifest_path_is_refused(
    store: RemoteStore, published: str, tmp_path: Path, path: str
) -> None:
    obj = json.loads(store.backend.get(manifest_key("db", published)).data)
    files = obj["files"]
    files[0]["path"] = path
    _plant_manifest(store, published, {"files": files})
    with pytest.raises(IntegrityError):
        store.checkout("db", dest=tmp_path / "sub" / "out")
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "sub" / "out").exists()


@pytest.mark.parametrize(
    "edit",
    [
        {"format": 2},
        {"chunk_size": 1000},
        {"name": "other"},
        {"extra": 1},
        {"files": [{"path": "a", "size": -1, "mode": 420, "chunks": []}]},
        {"files": [{"path": "a", "size": 1, "mode": 420, "chunks": ["zz"]}]},
    ],
)
def test_malformed_manifests_are_refused(
    store: RemoteStore, published: str, tmp_path: Path, edit: dict[str, object]
) -> None:
    _plant_manifest(store, published, edit)
    with pytest.raises(IntegrityError):
        store.checkout("db", dest=tmp_path / "out")
    _nothing_left(tmp_path)


def test_manifest_must_match_its_version_id(store: RemoteStore, published: str) -> None:
    key = manifest_key("db", published)
    obj = json.loads(store.backend.get(key).data)
    obj["message"] = "tampered"
    store.backend.put(key, canonical_json(obj))
    with pytest.raises(IntegrityError, match="version id"):
        store.resolve("db")


def test_manifest_copied_from_another_name(
    store: RemoteStore, published: str, tmp_path: Path
) -> None:
    write_tree(tmp_path / "o", {"x": b"other"})
    other = store.publish("other", tmp_path / "o").version
    store.backend.put(
        manifest_key("db", other), store.backend.get(manifest_key("other", other)).data
    )
    with pytest.raises(IntegrityError, match="belongs to"):
        store.resolve("db", other)


def test_duplicate_and_overlapping_paths_are_refused(store: RemoteStore, published: str) -> None:
    obj = json.loads(store.backend.get(manifest_key("db", published)).data)
    for files in (
        [obj["files"][0], obj["files"][0]],
        [obj["files"][0], {**obj["files"][0], "path": obj["files"][0]["path"] + "/x"}],
    ):
        with pytest.raises(IntegrityError):
            Manifest.from_json(canonical_json({**obj, "files": files}))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _corrupt(store: RemoteStore, v2: str, old_ref: bytes, src: Path, kind: str) -> None:
    """Damage version ``v2`` (latest) of "db" the way ``kind`` says."""
    b = store.backend
    manifest = store.load_manifest("db", v2)
    packs = sorted(manifest.packs)
    mkey = manifest_key("db", v2)
    if kind.startswith("pack"):
        key = pack_key("db", packs[0])
        data = b.get(key).data
        # a pack may also hold chunks only older versions use: damage one v2 needs
        used = max(
            (c for c in manifest.chunks.values() if c.pack == packs[0]), key=lambda c: c.offset
        )
        if kind == "pack bit flip":
            b.put(key, _flip(data, used.offset + used.length // 2))
        elif kind == "pack truncated":
            b.put(key, data[: used.offset + used.length - 1])
        elif kind == "pack emptied":  # every range starts past the end (S3: 416)
            b.put(key, b"")
        elif kind == "pack deleted":
            b.delete(key)
        else:  # "packs swapped"
            other = pack_key("db", packs[1])
            b.put(key, b.get(other).data)
            b.put(other, data)
    elif kind == "manifest bit flip":
        b.put(mkey, _flip(b.get(mkey).data, 40))
    elif kind == "manifest truncated":
        b.put(mkey, b.get(mkey).data[:-20])
    elif kind == "manifest deleted":
        b.delete(mkey)
    elif kind == "manifest from another name":
        theirs = RemoteStore(b).publish("other", src).version
        b.put(mkey, b.get(manifest_key("other", theirs)).data)
    elif kind == "ref garbage":
        b.put(ref_key("db", "latest"), b'{"version": 12}')
    elif kind == "ref nested 200,000 deep":
        b.put(ref_key("db", "latest"), b"[" * 200_000)
    else:  # "ref replayed (old)"
        b.put(ref_key("db", "latest"), old_ref)


# The table in docs/RELIABILITY.md: each kind of damage and the error a checkout reports.
CORRUPTIONS: dict[str, type[Exception]] = {
    "pack bit flip": IntegrityError,
    "pack truncated": IntegrityError,
    "pack emptied": IntegrityError,
    "pack deleted": SnapshotNotFoundError,
    "packs swapped": IntegrityError,
    "manifest bit flip": IntegrityError,
    "manifest truncated": IntegrityError,
    "manifest deleted": SnapshotNotFoundError,
    "manifest from another name": IntegrityError,
    "ref garbage": IntegrityError,
    "ref nested 200,000 deep": IntegrityError,
    "ref replayed (old)": IntegrityError,
}


@pytest.fixture(params=["memory", "file", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> RemoteStore:
    """The matrix holds on every kind of backend (S3 answers a range past the end with 416)."""
    if request.param == "memory":
        backend = open_backend(f"memory://i-{uuid.uuid4().hex}")
    elif request.param == "file":
        backend = open_backend(str(tmp_path / "store"))
    else:
        moto: MotoServer = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
        backend = S3Backend(bucket, "m", settings=S3Settings(endpoint_url=moto.endpoint_url))
    return RemoteStore(backend, chunk_size=4096, pack_target=8192)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruption_matrix(any_store: RemoteStore, tmp_path: Path, kind: str) -> None:
    store = any_store
    src = write_tree(tmp_path / "src", {"a.bin": bytes(range(256)) * 200, "d/b.txt": b"b" * 9000})
    store.publish("db", src)
    old_ref = store.backend.get(ref_key("db", "latest")).data
    (src / "a.bin").write_bytes(bytes(range(255, -1, -1)) * 200)
    v2 = store.publish("db", src).version
    assert store.resolve("db").version == v2  # this store has now seen generation 2
    _corrupt(store, v2, old_ref, src, kind)
    with pytest.raises(CORRUPTIONS[kind]) as caught:
        store.checkout("db", dest=tmp_path / "out")
    _nothing_left(tmp_path)
    if kind.startswith("pack"):
        assert not store.verify("db", v2).ok
    if kind == "ref replayed (old)":
        assert "went backwards" in str(caught.value)
