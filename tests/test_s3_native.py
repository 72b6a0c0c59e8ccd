"""A checkout's pack reads through awscrt's native client (backends/s3native.py), against
moto's S3 server behind a loopback proxy: exact bytes, the same errors as botocore's path,
a stalled answer asked again, the deadline kept by the call and by the call after it, and
nothing handed on by an attempt once it was given up."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chroma_snapshots import CachedStore, RemoteStore, StoreConfig
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.backends.s3native import Feed, wants_native
from chroma_snapshots.engine.deadline import Deadline, within
from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    SnapshotNotFoundError,
    StorageTimeoutError,
    StoreNotFoundError,
)
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.proxy import CountingProxy

CHUNK = 4096


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[CountingProxy]:
    with CountingProxy(moto_server.endpoint_url) as p:
        yield p


def _backend(proxy: CountingProxy, bucket: str, **settings: float) -> S3Backend:
    conf = S3Settings(endpoint_url=proxy.url, reader="crt", **settings)  # type: ignore[arg-type]
    backend = S3Backend(bucket, "snaps", settings=conf)
    assert backend.native
    return backend


class _Taker:
    """A ``take`` over fixed chunk boundaries, as the checkout's: hands back how many bytes
    at the front are whole chunks (or the gap before the next), records what it took."""

    def __init__(self, start: int, bounds: list[int]) -> None:
        self.start, self.bounds = start, bounds  # chunk ends, relative to start
        self.out = bytearray()
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, view: memoryview, offset: int) -> int:
        with self.lock:
            self.calls += 1
            assert offset == self.start + len(self.out)
            end = offset - self.start + len(view)
            whole = max((b for b in self.bounds if b <= end), default=0)
            used = max(whole - (offset - self.start), 0)
            self.out += view[:used]
            return used


def _collect(backend: S3Backend, key: str, span: tuple[int, int]) -> bytes:
    bounds = [*range(CHUNK, span[1] - span[0], CHUNK), span[1] - span[0]]
    taker = _Taker(span[0], bounds)
    got = backend.read_range(key, span, memoryview(bytearray(2 * CHUNK)), taker)
    assert got == span[1] - span[0]
    return bytes(taker.out)


def test_pieces_of_any_size_are_handed_on_exactly() -> None:
    """Every split of a range into two and three pieces gives the bytes a single piece
    gives: a chunk cut by a piece's end is completed in the feed's own buffer."""
    data = os.urandom(5 * 100 + 37)
    bounds = [100, 200, 300, 400, 500, len(data)]
    for cut in range(len(data) + 1):
        for second in (cut, min(len(data), cut + 1), min(len(data), cut + 150)):
            taker = _Taker(1000, bounds)
            feed = Feed(taker, 1000, 1000 + len(data), 256)
            for a, b in ((0, cut), (cut, second), (second, len(data))):
                feed.add(memoryview(data)[a:b])
            assert bytes(taker.out) == data, (cut, second)
            assert feed.received == 1000 + len(data)


def test_a_chunk_larger_than_the_buffer_is_refused() -> None:
    taker = _Taker(0, [600, 700])
    feed = Feed(taker, 0, 700, 256)
    feed.add(memoryview(bytes(100)))  # held: the first chunk is not whole
    with pytest.raises(IntegrityError, match="larger than a read buffer"):
        feed.add(memoryview(bytes(300)))


def test_ranges_are_read_exactly_in_one_request_each(proxy: CountingProxy, s3_bucket: str) -> None:
    backend = _backend(proxy, s3_bucket)
    data = os.urandom(300_000)
    backend.put("obj", data)
    proxy.reset()
    for span in ((0, 300_000), (123, 99_001), (4096, 8192)):
        assert _collect(backend, "obj", span) == data[span[0] : span[1]]
    gets = [r for r in proxy.reset() if r.method == "GET"]
    assert [r.response_bytes for r in gets] == [300_000, 99_001 - 123, 4096]


def test_a_checkout_through_the_native_client_is_exact(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path
) -> None:
    backend = _backend(proxy, s3_bucket)
    remote = RemoteStore(backend, chunk_size=CHUNK, pack_target=64 * CHUNK)
    cached = CachedStore(remote, tmp_path / "cache")
    src = write_tree(tmp_path / "src", {"db.sqlite3": os.urandom(90 * CHUNK), "a/b": b"x"})
    cached.publish("db", src)
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)
    assert backend._native is not None  # the packs came through it
    with open(src / "db.sqlite3", "r+b") as f:  # an incremental checkout too
        f.seek(40 * CHUNK)
        f.write(b"changed")
    cached.publish("db", src)
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)


def test_a_damaged_pack_is_refused_and_nothing_is_served(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path
) -> None:
    backend = _backend(proxy, s3_bucket)
    remote = RemoteStore(backend, chunk_size=CHUNK, pack_target=64 * CHUNK)
    remote.publish("db", write_tree(tmp_path / "src", {"a.bin": os.urandom(20 * CHUNK)}))
    (pack,) = [m.key for m in backend.list("") if "/packs/" in f"/{m.key}"]
    body = bytearray(backend.get(pack).data)
    body[len(body) // 2] ^= 0xFF
    backend.put(pack, bytes(body))
    with pytest.raises(IntegrityError):
        remote.checkout("db", dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_errors_are_the_documented_ones(
    proxy: CountingProxy, s3_bucket: str, moto_server: MotoServer
) -> None:
    backend = _backend(proxy, s3_bucket)
    backend.put("obj", os.urandom(10_000))
    with pytest.raises(SnapshotNotFoundError):
        _collect(backend, "missing", (0, 100))
    with pytest.raises(
        IntegrityError, match="ends before byte 20000"
    ):  # 416: a range past the object's end
        _collect(backend, "obj", (20_000, 20_100))
    proxy.ignore_range("obj")
    with pytest.raises(BackendUnavailableError, match="ignores Range"):
        _collect(backend, "obj", (100, 5000))
    gone = S3Backend("no-such-bucket-here", settings=S3Settings(endpoint_url=proxy.url))
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        _collect(gone, "obj", (0, 100))


def test_a_stalled_answer_is_asked_again(proxy: CountingProxy, s3_bucket: str) -> None:
    backend = _backend(proxy, s3_bucket, read_timeout=1.0)
    data = os.urandom(200_000)
    backend.put("obj", data)
    proxy.reset()
    proxy.stall("obj", count=1, after_bytes=50_000, hold=30)
    assert _collect(backend, "obj", (0, 200_000)) == data
    gets = [r for r in proxy.reset() if r.method == "GET"]
    assert len(gets) == 2


def test_the_deadline_holds_for_the_call_and_the_call_after_it(
    proxy: CountingProxy, s3_bucket: str
) -> None:
    """Every answer stalls: the read fails when its deadline passes, hands nothing on
    after that when the answer comes after all, and the same backend's next read, on a
    server that answers again, keeps its own deadline and is exact."""
    backend = _backend(proxy, s3_bucket)  # read_timeout 30 s: the deadline comes first
    data = os.urandom(200_000)
    backend.put("obj", data)
    proxy.stall("obj", count=3, after_bytes=10_000, hold=3)
    taker = _Taker(0, [200_000])
    buf = memoryview(bytearray(CHUNK))
    t = time.monotonic()
    with pytest.raises(StorageTimeoutError, match="deadline"):
        within(Deadline(1.0), lambda: backend.read_range("obj", (0, 200_000), buf, taker))
    assert time.monotonic() - t < 2.0
    calls = taker.calls
    time.sleep(3.5)  # the stalled answers end now: nothing of them is handed on
    assert taker.calls == calls == 0
    proxy.reset()
    t = time.monotonic()
    got = within(Deadline(10.0), lambda: _collect(backend, "obj", (0, 200_000)))
    assert got == data
    assert time.monotonic() - t < 10.0


def test_the_reader_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert wants_native("crt")  # the crt extra is installed here
    assert wants_native("auto")
    assert not wants_native("botocore")
    with pytest.raises(ConfigError, match="not one of"):
        wants_native("fast")
    env = {"CHROMA_SNAPSHOTS_URL": "s3://b/p", "CHROMA_SNAPSHOTS_S3_READER": "Botocore"}
    assert StoreConfig.from_env(env).s3_reader == "botocore"
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_S3_READER='awscrt'"):
        StoreConfig.from_env({**env, "CHROMA_SNAPSHOTS_S3_READER": "awscrt"})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "awscrt" else real(n))
    assert not wants_native("auto")  # without the extra: botocore, silently
    with pytest.raises(ConfigError, match=r"chroma-snapshots\[crt\]"):
        wants_native("crt")
