"""CachedStore against a real local S3 server, counting what the server actually received."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from kill_points import KillAt, run_to_step
from reliability import record, runs

from chroma_snapshots import (
    BackendUnavailableError,
    CachedStore,
    CacheFullError,
    RemoteStore,
    StorageTimeoutError,
    StoreConfig,
    open_store,
)
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import SnapshotStoreTests, read_tree, write_tree
from chroma_snapshots.testing.faults import FaultPlan
from chroma_snapshots.testing.proxy import CountingProxy

CHUNK = 4096


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[CountingProxy]:
    with CountingProxy(moto_server.endpoint_url) as p:
        yield p


def _remote(endpoint: str, bucket: str, **settings: float) -> RemoteStore:
    s3 = S3Backend(bucket, "snaps", settings=S3Settings(endpoint_url=endpoint, **settings))  # type: ignore[arg-type]
    return RemoteStore(s3, chunk_size=CHUNK, pack_target=16 * CHUNK)


@pytest.fixture
def cached(proxy: CountingProxy, s3_bucket: str, tmp_path: Path) -> CachedStore:
    return CachedStore(_remote(proxy.url, s3_bucket), tmp_path / "cache")


def _src(tmp_path: Path) -> Path:
    rng = random.Random(3)
    return write_tree(
        tmp_path / "src",
        {
            "chroma.sqlite3": rng.randbytes(40 * CHUNK),
            "seg/data_level0.bin": rng.randbytes(10 * CHUNK),
            "seg/header.bin": b"header",
            "seg/empty": b"",
        },
    )


class TestCachedStoreConformance(SnapshotStoreTests):
    @pytest.fixture
    def store(self, moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> CachedStore:
        return CachedStore(_remote(moto_server.endpoint_url, s3_bucket), tmp_path / "cache")


def test_warm_checkout_is_one_small_request(
    cached: CachedStore, proxy: CountingProxy, tmp_path: Path
) -> None:
    src = _src(tmp_path)
    cached.publish("db", src)
    cold = cached.checkout("db")
    assert read_tree(cold.path) == read_tree(src)
    cold.release()
    proxy.reset()
    with cached.checkout("db") as warm:
        assert warm.path == cold.path
        assert read_tree(warm.path) == read_tree(src)
    seen = proxy.reset()
    assert len(seen) <= 1
    assert all(r.method == "GET" and "/refs/" in r.path for r in seen)
    assert all(r.response_bytes < 1024 for r in seen)
    assert warm.stats.bytes_downloaded == 0
    assert warm.stats.requests == 1


def test_incremental_downloads_exactly_the_changed_chunk(
    cached: CachedStore, proxy: CountingProxy, tmp_path: Path
) -> None:
    src = _src(tmp_path)
    cached.publish("db", src)
    cached.checkout("db").release()
    with open(src / "chroma.sqlite3", "r+b") as f:
        f.seek(17 * CHUNK + 100)
        f.write(b"new page bytes")
    v2 = cached.publish("db", src)
    proxy.reset()
    with cached.checkout("db") as snap:
        assert snap.info.version == v2.version
        assert read_tree(snap.path) == read_tree(src)
    packs = [r for r in proxy.reset() if "/packs/" in r.path]
    assert len(packs) == 1
    manifest = cached.inner.load_manifest("db", v2.version)
    changed = [c for c in manifest.chunks.values() if c.pack in packs[0].path]
    assert len(changed) == 1
    assert packs[0].response_bytes == changed[0].length
    assert snap.stats.bytes_downloaded == changed[0].length
    assert snap.stats.bytes_reused == v2.total_size - CHUNK


@pytest.mark.parametrize("damage", ["modify", "truncate", "delete", "extra", "chmod"])
def test_consumer_changes_never_leak(
    cached: CachedStore, proxy: CountingProxy, tmp_path: Path, damage: str
) -> None:
    src = _src(tmp_path)
    cached.publish("db", src)
    with cached.checkout("db") as snap:
        target = snap.path / "chroma.sqlite3"
        if damage == "modify":
            with open(target, "r+b") as f:
                f.seek(5 * CHUNK)
                f.write(b"written by a consumer")
        elif damage == "truncate":
            os.truncate(target, 3 * CHUNK + 5)
        elif damage == "delete":
            target.unlink()
            shutil.rmtree(snap.path / "seg")
        elif damage == "extra":
            (snap.path / "chroma.sqlite3-wal").write_bytes(b"wal")
            (snap.path / "newdir").mkdir()
        else:
            target.chmod(0o600)
    proxy.reset()
    with cached.checkout("db") as again:
        assert read_tree(again.path) == read_tree(src)
        assert sorted(p.name for p in again.path.iterdir()) == ["chroma.sqlite3", "seg"]
        assert (again.path / "chroma.sqlite3").stat().st_mode & 0o777 == 0o644
    downloaded = sum(r.response_bytes for r in proxy.reset() if "/packs/" in r.path)
    if damage == "modify":
        assert 0 < downloaded <= 2 * CHUNK + 64  # only the damaged chunk(s), not the file
    elif damage in ("extra", "chmod"):
        assert downloaded == 0


def test_private_copy_with_dest(cached: CachedStore, tmp_path: Path) -> None:
    src = _src(tmp_path)
    cached.publish("db", src)
    snap = cached.checkout("db", dest=tmp_path / "mine")
    assert snap.path == tmp_path / "mine"
    (snap.path / "chroma.sqlite3").write_bytes(b"scribble")
    assert read_tree(cached.checkout("db").path) == read_tree(src)


def test_eviction_is_lru_and_spares_pinned(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path
) -> None:
    src = _src(tmp_path)
    remote = _remote(proxy.url, s3_bucket)
    size = sum(len(b) for b in read_tree(src).values())
    store = CachedStore(remote, tmp_path / "cache", max_bytes=int(size * 2.5))
    versions = []
    for i in range(3):
        (src / "seg/header.bin").write_bytes(b"v%d" % i)
        versions.append(store.publish("db", src).version)
    pinned = store.checkout("db", versions[0])  # held open
    store.checkout("db", versions[1]).release()
    assert store.dirs("db").complete() == sorted(versions[:2])
    store.checkout("db", versions[2]).release()  # needs room: evicts v1 (LRU unpinned), not v0
    assert store.dirs("db").complete() == sorted([versions[0], versions[2]])
    assert read_tree(pinned.path)["seg/header.bin"] == b"v0"
    assert store.usage() <= store.max_bytes  # type: ignore[operator]
    pins = store.dirs("db").root / "pins"  # an evicted version leaves no pins folder behind
    assert sorted(os.listdir(pins)) == sorted([versions[0], versions[2]])
    tiny = CachedStore(remote, tmp_path / "cache", max_bytes=size // 2)
    with pytest.raises(CacheFullError) as err:
        tiny.checkout("db", versions[1])
    assert isinstance(err.value, OSError)
    assert versions[1] not in tiny.dirs("db").complete()
    assert list((tiny.dirs("db").root / "tmp").iterdir()) == []


def test_enospc_on_a_small_tmpfs(proxy: CountingProxy, s3_bucket: str, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs -o size=2m tmpfs {mnt} 2>/dev/null") != 0:
        pytest.fail("this test needs root to mount a 2 MiB tmpfs (CI runs as root)")
    try:
        src = write_tree(tmp_path / "big", {"a.bin": os.urandom(3 << 20)})
        remote = _remote(proxy.url, s3_bucket)
        remote.publish("db", src)
        store = CachedStore(remote, mnt, min_free_bytes=0)
        with pytest.raises(CacheFullError):
            store.checkout("db")
        assert store.dirs("db").complete() == []
        # with the free-space check fooled, the real ENOSPC is still the documented error
        store.min_free_bytes = -(10 << 20)
        with pytest.raises(CacheFullError):
            store.checkout("db")
        assert store.dirs("db").complete() == []
        assert list((store.dirs("db").root / "tmp").iterdir()) == []
    finally:
        os.system(f"umount -l {mnt}")  # lazy: never leave a mount behind, even if busy


def _cached_then_down(
    proxy: CountingProxy, bucket: str, tmp_path: Path
) -> tuple[Path, str, RemoteStore]:
    """A version published and cached under tmp_path/cache; then the same endpoint goes
    down (every connection reset: a cache is keyed by the endpoint, so an outage keeps the
    URL rather than pointing at another one). The source, the version, the store down."""
    src = _src(tmp_path)
    good = CachedStore(_remote(proxy.url, bucket), tmp_path / "cache")
    version = good.publish("db", src).version
    good.checkout("db").release()
    proxy.faults = FaultPlan(1.0, kinds=("reset",))
    return src, version, _remote(proxy.url, bucket, connect_timeout=0.5, max_attempts=1)


def test_stale_ok_serves_cache_when_store_is_unreachable(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path
) -> None:
    src, version, down = _cached_then_down(proxy, s3_bucket, tmp_path)
    offline = CachedStore(down, tmp_path / "cache", stale_ok=True)
    with offline.checkout("db", deadline=5) as snap:
        assert snap.stale
        assert snap.info.version == version
        assert read_tree(snap.path) == read_tree(src)
    # the same answer from the other reads a caller makes before a checkout
    assert offline.current_version("db", deadline=5) == (version, True)
    assert offline.resolve("db", deadline=5).version == version
    assert offline.resolve("db", version, deadline=5).version == version
    assert offline.load_manifest("db", version, deadline=5).total_size > 0
    strict = CachedStore(down, tmp_path / "cache")
    with pytest.raises((BackendUnavailableError, StorageTimeoutError)):
        strict.checkout("db", deadline=5)


@pytest.mark.parametrize("call", ["publish", "set_ref"])
def test_a_move_that_failed_before_it_was_sent_keeps_the_stale_answer(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path, call: str
) -> None:
    """A publish or ref move refused at its first request (the store down) made the cache
    forget what latest named, so the stale reads stopped too (found by a review). Nothing
    was sent: the cache still serves, stale, what latest named."""
    src, version, down = _cached_then_down(proxy, s3_bucket, tmp_path)
    cache = CachedStore(down, tmp_path / "cache", stale_ok=True)
    move = (
        partial(cache.publish, "db", src)
        if call == "publish"
        else partial(cache.set_ref, "db", "latest", version, expected=version)
    )
    with pytest.raises((BackendUnavailableError, StorageTimeoutError)) as got:
        move(deadline=5)
    with cache.checkout("db", deadline=5) as snap:
        assert (snap.stale, snap.info.version) == (True, version)
    assert got.value.ref_untouched  # and the error says so


def test_an_offline_publish_keeps_the_offline_answer(tmp_path: Path) -> None:
    """`--offline publish` is refused before anything is sent: the offline checkout after
    it still serves what latest named (it was exit 7: the cache had forgotten)."""
    src = _src(tmp_path)
    url, cache_dir = str(tmp_path / "store"), str(tmp_path / "cache")
    online = open_store(StoreConfig(url=url, cache_dir=cache_dir))
    version = online.publish("db", src).version
    online.checkout("db").release()
    offline = open_store(StoreConfig(url=url, cache_dir=cache_dir, offline=True))
    with pytest.raises(BackendUnavailableError, match="not contacted"):
        offline.publish("db", src)
    with pytest.raises(BackendUnavailableError, match="not contacted"):
        offline.set_ref("db", "latest", version, expected=version)
    with offline.checkout("db") as snap:
        assert (snap.stale, snap.info.version) == (True, version)


def test_a_failed_move_never_puts_back_what_another_move_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish through one cache object fails before its move is sent, while another
    (another process on the same cache) rolls latest back: the failed one must not put
    its old memory of latest over the rollback's. It did, and offline reads then served
    the version the rollback replaced (found by a review)."""
    url, cache_dir = str(tmp_path / "store"), str(tmp_path / "cache")
    one = open_store(StoreConfig(url=url, cache_dir=cache_dir))
    v1 = one.publish("db", write_tree(tmp_path / "a", {"f": b"a"})).version
    v2 = one.publish("db", write_tree(tmp_path / "b", {"f": b"b"})).version
    with one.checkout("db", v1):  # held: latest is built beside it, not patched from it
        one.checkout("db").release()  # both cached
    other = open_store(StoreConfig(url=url, cache_dir=cache_dir))

    def publish_while_rolled_back(*args: object, **kwargs: object) -> None:
        other.set_ref("db", "latest", v1, expected=v2)  # the rollback lands meanwhile
        error = BackendUnavailableError("the store went down before the move was sent")
        error.ref_untouched = True
        raise error

    assert isinstance(one, CachedStore)
    monkeypatch.setattr(one.inner, "publish", publish_while_rolled_back)
    with pytest.raises(BackendUnavailableError):
        one.publish("db", tmp_path / "b")
    offline = open_store(StoreConfig(url=url, cache_dir=cache_dir, offline=True))
    with offline.checkout("db") as snap:  # what the rollback recorded, never v2
        assert (snap.stale, snap.info.version) == (True, v1)


# publishes argv[3] to the store argv[1] through the cache argv[2], dying (SIGKILL) once the
# cache has forgotten latest and before the store's publish sends anything
KILLED_MOVE = """
import os, signal, sys
from chroma_snapshots import StoreConfig, open_store
store = open_store(StoreConfig(url=sys.argv[1], cache_dir=sys.argv[2]))
store.inner.publish = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
store.publish("db", sys.argv[3])
"""


@pytest.mark.parametrize("ending", ["killed", "timed out"])
def test_a_move_that_may_have_landed_leaves_the_ref_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """A move whose outcome is unknown: the process killed after the cache forgot latest
    (before or while the move was sent), or no answer in time. The cache may serve
    neither the version latest named (the move may have landed) nor any other: offline
    reads refuse until an online read learns latest again."""
    url, cache_dir = str(tmp_path / "store"), str(tmp_path / "cache")
    one = open_store(StoreConfig(url=url, cache_dir=cache_dir))
    v1 = one.publish("db", write_tree(tmp_path / "a", {"f": b"a"})).version
    one.checkout("db").release()
    offline = open_store(StoreConfig(url=url, cache_dir=cache_dir, offline=True))
    with offline.checkout("db") as snap:
        assert snap.info.version == v1  # remembered before the move
    src = str(write_tree(tmp_path / "b", {"f": b"b"}))
    if ending == "killed":
        died = subprocess.run([sys.executable, "-c", KILLED_MOVE, url, cache_dir, src])
        assert died.returncode == -9
    else:

        def no_answer(*args: object, **kwargs: object) -> None:
            raise StorageTimeoutError("no answer in time: the move may have landed")

        assert isinstance(one, CachedStore)
        monkeypatch.setattr(one.inner, "publish", no_answer)
        with pytest.raises(StorageTimeoutError) as got:
            one.publish("db", src)
        assert not got.value.ref_untouched
    with pytest.raises(BackendUnavailableError, match="not contacted"):
        offline.checkout("db")  # not v1: latest may name another version by now
    again = open_store(StoreConfig(url=url, cache_dir=cache_dir))
    again.checkout("db").release()  # online: latest learned again
    with offline.checkout("db") as snap:
        assert (snap.stale, snap.info.version) == (True, v1)  # nothing was published


WORKER = str(Path(__file__).with_name("cache_worker.py"))


def _digests(root: Path) -> str:
    lines = [f"{p} {hashlib.sha256(b).hexdigest()}" for p, b in read_tree(root).items()]
    return "".join(line + "\n" for line in lines)


def test_four_processes_share_one_download(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(3 << 20), "x/y": b"y"})
    RemoteStore(S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=proxy.url))).publish(
        "db", src
    )
    proxy.reset()
    cmd = [sys.executable, WORKER, proxy.url, s3_bucket, str(tmp_path / "cache")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=120)[0].split("\n", 1)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs == [_digests(src)] * 4
    pack_reads = [r for r in proxy.reset() if "/packs/" in r.path]
    stored = sum(r.response_bytes for r in pack_reads)
    assert stored >= 3 << 20  # random data is stored raw
    assert stored < (3 << 20) + (1 << 16)  # ...and was downloaded once, not four times


def test_sigkill_during_materialization_never_serves_a_partial_tree(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    """SIGKILL a cold checkout at each of its steps (the worker waits at the step, its other
    download threads keep writing): reading the manifest, at a random pack read (from the
    first to the last), and while holding the finished checkout. The next process cleans up
    and serves exactly what was published."""
    rng = random.Random(99)
    src = write_tree(
        tmp_path / "src", {"chroma.sqlite3": os.urandom(8 << 20), "seg/a": os.urandom(999)}
    )
    remote = _remote(moto_server.endpoint_url, s3_bucket)
    packs = len(remote.load_manifest("db", remote.publish("db", src).version).packs)
    cache = tmp_path / "cache"
    cmd = [sys.executable, WORKER, moto_server.endpoint_url, s3_bucket, str(cache), "--steps"]
    steps = ("get manifests", "get packs", "holding checkout")
    kills: Counter[str] = Counter()
    total = runs(ci=3 * len(steps), long=50)
    for run in range(total):
        step, label, nth = steps[run % len(steps)], steps[run % len(steps)], 1
        if step == "get packs":  # the first, second and last third of the reads in turn
            third = run // len(steps) % 3
            nth = rng.randint(third * packs // 3 + 1, (third + 1) * packs // 3)
            label = f"get packs ({('first', 'second', 'last')[third]} third)"
        done = run_to_step(cmd, KillAt(step, nth))
        assert done.killed_at == step, f"run {run} never reached {step} #{nth}: {done.steps}"
        kills[label] += 1
        store = CachedStore(_remote(moto_server.endpoint_url, s3_bucket), cache)  # cleans up
        tmp = store.dirs("db").root / "tmp"
        assert not tmp.exists() or list(tmp.iterdir()) == []
        with store.checkout("db") as snap:
            assert _digests(snap.path) == _digests(src)
        for v in store.dirs("db").complete():
            store.evict("db", v)  # next run starts cold again
        assert store.dirs("db").complete() == []
    assert len(kills) == 5  # each step, and pack reads in each third, killed at least once
    record("crash-materializer", {"runs": total, **{f"killed at {k}": n for k, n in kills.items()}})
