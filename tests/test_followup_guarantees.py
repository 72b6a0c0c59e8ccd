"""Guarantees of issue 13 beyond the data path: after any timed-out call the next one on the
same store object runs in its normal time (publish, multipart publish, verify, prune,
resolve, versions), a full or read-only disk under a file store, the cache or publish
staging ends in a documented error and leaves nothing behind, and hostile refs, manifests,
metadata and cache files end in documented errors at a bounded cost."""

from __future__ import annotations

import errno
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
from chroma_helpers import build
from test_datapath_guarantees import Mount, tmpfs  # noqa: F401 (a fixture used below)

from chroma_snapshots import (
    BackendUnavailableError,
    CachedStore,
    CacheFullError,
    IntegrityError,
    InvalidInputError,
    LocalDiskError,
    RemoteStore,
    StorageTimeoutError,
)
from chroma_snapshots.backends.base import Backend
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.chroma import close_client, publish_client
from chroma_snapshots.engine.validation import MAX_METADATA_DEPTH, MAX_REF_BYTES
from chroma_snapshots.stores import remote
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.faults import FaultPlan
from chroma_snapshots.testing.proxy import CountingProxy

MiB = 1 << 20
WORKERS = 4
T = TypeVar("T")
HOLD = 20.0  # seconds a stalled request stays stuck: longer than every call after it


class Stalls(FaultPlan):
    """Stalls every request ``match`` picks: a GET answers half its body and then nothing,
    an upload is held before it is forwarded; ``stalled`` counts them."""

    def __init__(self) -> None:
        super().__init__(0.0, stall_seconds=HOLD, latency_seconds=HOLD)
        self.match: Callable[[str, str], bool] | None = None
        self.stalled = 0

    def draw(self, method: str, path: str) -> str | None:
        match = self.match
        if match is None or not match(method, path):
            return None
        self.stalled += 1
        return "stall" if method == "GET" else "latency"


def _random_tree(root: Path, sizes: dict[str, int]) -> Path:
    return write_tree(root, {name: os.urandom(n) for name, n in sizes.items()})


# After any timed-out call, the next one on the same store object succeeds in its time.


@pytest.fixture
def stalled_store(moto_server: MotoServer, s3_bucket: str) -> Iterator[tuple[RemoteStore, Stalls]]:
    plan = Stalls()
    with CountingProxy(moto_server.endpoint_url, faults=plan) as proxy:
        # read_timeout 30 s: only the deadline ends a stalled request. Packs over 1 MiB go
        # up in 5 MiB parts (S3's smallest), so a 6 MiB pack is a two-part upload.
        settings = S3Settings(
            endpoint_url=proxy.url,
            connect_timeout=1,
            read_timeout=30.0,
            multipart_threshold=MiB,
            part_size=5 * MiB,
        )
        backend = S3Backend(s3_bucket, "snaps", settings=settings)
        store = RemoteStore(backend, chunk_size=64 << 10, pack_target=6 * MiB, workers=WORKERS)
        yield store, plan
    # (leaving the proxy ends the holds: held uploads reach the server, still up, at once)


def _times_out(plan: Stalls, match: Callable[[str, str], bool], call: Callable[[], object]) -> int:
    """Run ``call`` (its deadline at most 4 s) with the requests ``match`` picks stalled; it must
    raise StorageTimeoutError soon after its deadline. Returns how many requests stalled."""
    plan.match, plan.stalled = match, 0
    try:
        t = time.monotonic()
        with pytest.raises(StorageTimeoutError):
            call()
        assert time.monotonic() - t < 4 + 1.5  # every timed-out call below has deadline <= 4
    finally:
        plan.match = None  # healthy from here; the stalled requests stay stuck for HOLD
    return plan.stalled


def _in_time(deadline: float, call: Callable[..., T]) -> T:
    """``call(deadline=deadline)``, which must return (not raise) before its deadline."""
    t = time.monotonic()
    out = call(deadline=deadline)
    assert time.monotonic() - t < deadline
    return out


def _get(part: str) -> Callable[[str, str], bool]:
    return lambda method, path: method == "GET" and part in path


def _pack_put(method: str, path: str) -> bool:
    return method == "PUT" and "/packs/" in path and "uploadId" not in path


def _part_put(method: str, path: str) -> bool:
    return method == "PUT" and "uploadId" in path


def _versions(store: RemoteStore, deadline: float) -> list[str]:
    return [info.version for info in store.versions("db", deadline=deadline)]


def test_after_any_timed_out_call_the_next_on_the_same_store_runs_in_its_time(
    stalled_store: tuple[RemoteStore, Stalls], tmp_path: Path
) -> None:
    store, plan = stalled_store
    small = _random_tree(tmp_path / "small", {"a.bin": 200_000})
    big = _random_tree(tmp_path / "big", {f"{i}.bin": 6 * MiB for i in range(WORKERS)})

    # publish, one small pack whose upload stalls
    assert _times_out(plan, _pack_put, partial(store.publish, "db", small, deadline=2)) >= 1
    assert store.read_ref("db") is None  # nothing was made visible
    v1 = _in_time(8, partial(store.publish, "db", small)).version

    # publish, four 6 MiB packs of two parts each, every part upload stalled: as many
    # parts as a shared 8-thread part pool had threads
    big_publish = partial(store.publish, "db", big)
    assert _times_out(plan, _part_put, partial(big_publish, deadline=4)) >= 2
    _wait_for(lambda: _no_uploads_open(store), "the abandoned multipart uploads are aborted")
    v2 = _in_time(10, big_publish).version  # ~1 s; 17 s when starved by the held parts
    assert store.resolve("db", deadline=8).version == v2 != v1

    # verify: every pack download stalls mid-body, at least one per worker
    verify = partial(store.verify, "db", v2)
    assert _times_out(plan, _get("/packs/"), partial(verify, deadline=2)) >= WORKERS
    assert _in_time(15, verify).ok

    # resolve: the ref's body stalls
    resolve = partial(store.resolve, "db")
    assert _times_out(plan, _get("/refs/"), partial(resolve, deadline=2)) >= 1
    assert _in_time(8, resolve).version == v2

    # versions: the manifests' bodies stall
    versions = partial(_versions, store)
    assert _times_out(plan, _get("/manifests/"), partial(versions, deadline=2)) >= 1
    assert _in_time(8, versions) == [v2, v1]

    # prune: its listing stalls
    prune = partial(store.prune, "db", keep_last=1, min_age=0)
    assert _times_out(plan, _get("list-type"), partial(prune, deadline=2)) >= 1
    assert _in_time(8, prune).deleted_versions == (v1,)

    # and the store still serves the right bytes
    snap = store.checkout("db", dest=tmp_path / "out", deadline=15)
    assert read_tree(snap.path) == read_tree(big)


def _no_uploads_open(store: RemoteStore) -> bool:
    backend = store.backend
    assert isinstance(backend, S3Backend)
    return not backend.client.list_multipart_uploads(Bucket=backend.bucket).get("Uploads")


def _wait_for(ok: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    end = time.monotonic() + seconds
    while not ok():
        assert time.monotonic() < end, f"not within {seconds} s: {what}"
        time.sleep(0.1)


# A file store on a full or read-only disk: a store failure, nothing half-published.


def _temp_files(root: Path) -> list[Path]:
    """Temp files store writes left behind (``.locks/`` holds the store's lock files)."""
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def _cause_errno(err: BaseException) -> int | None:
    cause = err.__cause__
    return cause.errno if isinstance(cause, OSError) else None


def _check_untouched(store: RemoteStore, version: str) -> None:
    found = store.read_ref("db")
    assert found is not None
    assert found[0].version == version
    assert store.verify("db", version).ok
    assert list(store.backend.list("db/pins/")) == []  # the failed publish's pin is gone
    assert isinstance(store.backend, FileBackend)
    assert _temp_files(store.backend.root) == []


def test_publishing_into_a_full_file_store(tmp_path: Path, tmpfs: Mount) -> None:  # noqa: F811
    mnt = tmpfs("size=2m")
    store = RemoteStore(FileBackend(mnt / "store"))
    v1 = store.publish("db", _random_tree(tmp_path / "v1", {"a.bin": 100_000})).version
    filler = mnt / "filler"
    filler.write_bytes(bytes(1200 << 10))  # leaves well under 1 MiB free
    src = _random_tree(tmp_path / "v2", {"a.bin": MiB})
    with pytest.raises(BackendUnavailableError) as err:  # the store's disk: a store failure
        store.publish("db", src)
    assert _cause_errno(err.value) == errno.ENOSPC
    _check_untouched(store, v1)
    filler.unlink()  # space freed: the same publish now works
    v2 = store.publish("db", src).version
    assert read_tree(store.checkout("db", v2, dest=tmp_path / "out").path) == read_tree(src)


def test_publishing_into_a_read_only_file_store(tmp_path: Path, tmpfs: Mount) -> None:  # noqa: F811
    mnt = tmpfs("size=2m")
    store = RemoteStore(FileBackend(mnt / "store"))
    v1 = store.publish("db", _random_tree(tmp_path / "v1", {"a.bin": 100_000})).version
    src = _random_tree(tmp_path / "v2", {"a.bin": 100_000})
    _remount(mnt, "ro")
    with pytest.raises(BackendUnavailableError) as err:
        store.publish("db", src)
    assert _cause_errno(err.value) == errno.EROFS
    _check_untouched(store, v1)  # reads still work on a read-only store
    _remount(mnt, "rw")
    v2 = store.publish("db", src).version
    assert read_tree(store.checkout("db", v2, dest=tmp_path / "out").path) == read_tree(src)


def _remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


# publish_client's staging copy on a full or read-only disk.


@pytest.fixture(scope="module")
def chroma_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed chroma database of 2.6 MB: 0.95 MB of segment files, 1.7 MB of sqlite."""
    path = tmp_path_factory.mktemp("chroma") / "db"
    close_client(build(path, {"docs": 3000}))
    return path


@pytest.mark.parametrize("size", ["512k", "2m"])  # full in the segment files / in sqlite
def test_publish_client_staging_on_a_full_disk(
    chroma_db: Path,
    tmp_path: Path,
    tmpfs: Mount,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    size: str,
) -> None:
    mnt = tmpfs(f"size={size}")
    monkeypatch.setattr(tempfile, "tempdir", str(mnt))  # where the staging copy goes
    store = RemoteStore(FileBackend(tmp_path / "store"))
    with pytest.raises(CacheFullError) as err:
        publish_client(store, "db", chroma_db)
    assert err.value.errno == errno.ENOSPC
    assert str(mnt) in str(err.value.filename)
    assert list(mnt.iterdir()) == []  # the staging copy is gone
    assert store.read_ref("db") is None
    assert list(store.backend.list("db/")) == []
    _remount(mnt, "ro")
    with pytest.raises(LocalDiskError) as ro:
        publish_client(store, "db", chroma_db)
    assert ro.value.errno == errno.EROFS
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    info = publish_client(store, "db", chroma_db)
    assert info.metadata["chroma"]["collections"] == {"docs": 3000}


# Hostile refs and manifests cost a bounded download; hostile metadata is refused.


def _proxied_store(proxy: CountingProxy, bucket: str) -> RemoteStore:
    return RemoteStore(S3Backend(bucket, "snaps", settings=S3Settings(endpoint_url=proxy.url)))


def _downloaded(proxy: CountingProxy, part: str) -> int:
    return sum(r.response_bytes for r in proxy.reset() if r.method == "GET" and part in r.path)


def test_an_oversized_ref_or_manifest_costs_its_bound_in_download(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = moto_server.client()
    s3.put_object(Bucket=s3_bucket, Key="snaps/db/refs/latest", Body=bytes(8 * MiB))
    version = "20260101T000000000000Z-0123456789ab"
    s3.put_object(Bucket=s3_bucket, Key=f"snaps/db/manifests/{version}.json", Body=bytes(MiB))
    monkeypatch.setattr(remote, "MAX_MANIFEST_BYTES", 64 << 10)  # a 256 MiB object is slow
    with CountingProxy(moto_server.endpoint_url) as proxy:
        store = _proxied_store(proxy, s3_bucket)
        with pytest.raises(IntegrityError, match="8388608 bytes"):
            store.read_ref("db")
        assert 0 < _downloaded(proxy, "/refs/") <= MAX_REF_BYTES + 1
        with pytest.raises(IntegrityError, match="1048576 bytes"):
            store.load_manifest("db", version)
        assert 0 < _downloaded(proxy, "/manifests/") <= (64 << 10) + 1


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_an_empty_ref_or_manifest_is_an_integrity_error(
    kind: str, moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    if kind == "s3":
        backend: Backend = S3Backend(
            s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url)
        )
    else:
        backend = FileBackend(tmp_path / "store")
    store = RemoteStore(backend)
    version = "20260101T000000000000Z-0123456789ab"
    backend.put("db/refs/latest", b"")
    backend.put(f"db/manifests/{version}.json", b"")
    with pytest.raises(IntegrityError):
        store.read_ref("db")
    with pytest.raises(IntegrityError):
        store.load_manifest("db", version)


def _nested(depth: int, make: Callable[[object], object]) -> object:
    o: object = 0
    for _ in range(depth):
        o = make(o)
    return o


def _cycle() -> dict[str, object]:
    d: dict[str, object] = {}
    d["self"] = d
    return d


BAD_METADATA: dict[str, Callable[[], object]] = {
    "deep dicts": lambda: _nested(200_000, lambda o: {"a": o}),
    "deep lists": lambda: {"a": _nested(200_000, lambda o: [o])},
    "deep tuples": lambda: {"a": _nested(200_000, lambda o: (o,))},
    "just too deep": lambda: _nested(MAX_METADATA_DEPTH + 1, lambda o: {"a": o}),
    "a cycle": _cycle,
    "an object": lambda: {"a": object()},
    "a set": lambda: {"a": {1, 2}},
    "NaN": lambda: {"a": math.nan},
    "a tuple key": lambda: {(1, 2): "a"},
    "an int of 5000 digits": lambda: {"a": 10**5000},
    "not a dict": lambda: ["a"],
}


@pytest.mark.parametrize("bad", sorted(BAD_METADATA))
def test_publish_metadata_json_cannot_hold_is_invalid_input(bad: str, tmp_path: Path) -> None:
    store = RemoteStore(FileBackend(tmp_path / "store"))
    src = _random_tree(tmp_path / "src", {"a.bin": 1000})
    with pytest.raises(InvalidInputError):
        store.publish("db", src, metadata=BAD_METADATA[bad]())  # type: ignore[arg-type]
    assert store.read_ref("db") is None


def test_publish_metadata_is_returned_as_readers_see_it(tmp_path: Path) -> None:
    store = RemoteStore(FileBackend(tmp_path / "store"))
    src = _random_tree(tmp_path / "src", {"a.bin": 1000})
    deepest = _nested(MAX_METADATA_DEPTH - 1, lambda o: {"a": o})
    info = store.publish("db", src, metadata={"t": (1, 2), 3: "x", "deep": deepest})  # type: ignore[dict-item]
    assert info.metadata == {"t": [1, 2], "3": "x", "deep": deepest}
    assert store.resolve("db").metadata == info.metadata


# Hostile or unwritable cache files.


def test_deeply_nested_cache_stamps_are_damage_not_a_recursion_error(tmp_path: Path) -> None:
    src = _random_tree(tmp_path / "src", {"a.bin": 100_000})
    remote_store = RemoteStore(FileBackend(tmp_path / "store"))
    version = remote_store.publish("db", src).version
    cached = CachedStore(remote_store, tmp_path / "cache", min_free_bytes=0)
    cached.checkout("db").release()
    dirs = cached.dirs("db")
    dirs.stamps_file(version).write_bytes(b"[" * 200_000 + b"]" * 200_000)
    assert dirs.read_stamps(version) == {}  # every file looks changed: re-verified
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)


def test_a_read_only_cache_dir_is_a_local_disk_error(tmp_path: Path, tmpfs: Mount) -> None:  # noqa: F811
    mnt = tmpfs("size=8m")
    remote_store = RemoteStore(FileBackend(tmp_path / "store"))
    remote_store.publish("db", _random_tree(tmp_path / "v1", {"a.bin": 100_000}))
    cached = CachedStore(remote_store, mnt / "cache", min_free_bytes=0)
    cached.checkout("db").release()
    src = _random_tree(tmp_path / "v2", {"a.bin": 100_000})
    v2 = remote_store.publish("db", src).version
    _remount(mnt, "ro")
    for call in (  # opening the cache; an existing cache object serving a new version
        lambda: CachedStore(remote_store, mnt / "cache"),
        lambda: cached.checkout("db"),
    ):
        with pytest.raises(LocalDiskError) as err:
            call()
        assert err.value.errno == errno.EROFS
        assert str(err.value.filename).startswith(str(mnt / "cache"))
    _remount(mnt, "rw")
    with cached.checkout("db") as snap:
        assert snap.info.version == v2
        assert read_tree(snap.path) == read_tree(src)
