"""Large coalesced reads streamed through a small buffer (S3Backend.read_range and
engine/streaming.py stream_and_place): one request per read, chunks placed as they become
whole, a broken body resumed from the first byte not held, a short answer refused, an
answer that is not the range asked for refused as the server's fault."""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ResponseStreamingError

from chroma_snapshots import CachedStore, RemoteStore, StoreConfig, open_remote
from chroma_snapshots.backends import s3body
from chroma_snapshots.backends.cas import ConditionalWriteCheck, conditional_write_check
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine.streaming import RangeStreamer
from chroma_snapshots.errors import BackendUnavailableError, IntegrityError
from chroma_snapshots.stores import fetch
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.proxy import CountingProxy

CHUNK = 4096


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[CountingProxy]:
    with CountingProxy(moto_server.endpoint_url) as p:
        yield p


def _backend(proxy: CountingProxy, bucket: str) -> S3Backend:
    return S3Backend(bucket, "snaps", settings=S3Settings(endpoint_url=proxy.url))


def _collect(backend: S3Backend, key: str, span: tuple[int, int], size: int) -> bytes:
    """Stream ``span`` through a ``size``-byte buffer, taking odd amounts each time."""
    out = bytearray()
    rng = random.Random(1)

    def take(view: memoryview, offset: int) -> int:
        assert offset == span[0] + len(out)
        n = len(view) if offset + len(view) == span[1] else rng.randrange(1, len(view) + 1)
        out.extend(view[:n])
        return n

    got = backend.read_range(key, span, memoryview(bytearray(size)), take)
    assert got == span[1] - span[0]
    return bytes(out)


def test_a_range_streams_through_a_small_buffer_in_one_request(
    proxy: CountingProxy, s3_bucket: str
) -> None:
    backend = _backend(proxy, s3_bucket)
    data = os.urandom(100_000)
    backend.put("obj", data)
    proxy.reset()
    assert _collect(backend, "obj", (123, 99_001), 1000) == data[123:99_001]
    assert len(proxy.reset()) == 1


def test_a_broken_body_is_resumed_where_it_broke(
    proxy: CountingProxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _backend(proxy, s3_bucket)
    data = os.urandom(50_000)
    backend.put("obj", data)
    real, calls = s3body.BodyReader.readinto, [0]

    def breaks_once(self: s3body.BodyReader, view: memoryview) -> int:
        calls[0] += 1
        if calls[0] == 5:
            raise ResponseStreamingError(error=ConnectionResetError("cut"))
        return real(self, view)

    monkeypatch.setattr(s3body.BodyReader, "readinto", breaks_once)
    proxy.reset()
    assert _collect(backend, "obj", (0, 50_000), 777) == data
    ranges = [r for r in proxy.reset() if r.method == "GET"]
    assert len(ranges) == 2  # the second asks only for what was not held


def test_a_checkout_split_across_buffer_ends_is_exact(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a buffer of 1.2 chunks: nearly every chunk is cut by a buffer's end at least once
    monkeypatch.setattr(fetch, "STREAM_BUFFER", CHUNK + CHUNK // 5)
    remote = RemoteStore(_backend(proxy, s3_bucket), chunk_size=CHUNK, pack_target=64 * CHUNK)
    cached = CachedStore(remote, tmp_path / "cache", patch_in_place=False)
    rng = random.Random(5)
    text = b"".join(b"row %d %s\n" % (i, rng.randbytes(8).hex().encode()) for i in range(9000))
    src = write_tree(tmp_path / "src", {"db.sqlite3": text, "seg/a.bin": rng.randbytes(40 * CHUNK)})
    cached.publish("db", src)
    proxy.reset()
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)
    packs = [r for r in proxy.reset() if "/packs/" in r.path]
    assert len(packs) == len({r.path for r in packs})  # one request per pack
    with open(src / "seg/a.bin", "r+b") as f:  # changed chunks stored as deltas
        for page in (3, 17, 30):
            f.seek(page * CHUNK + 10)
            f.write(b"changed")
    cached.publish("db", src)
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)


def test_a_store_opened_from_its_url_streams_on_every_python(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path
) -> None:
    """A store opened from its URL has its S3 backend behind the conditional-write check,
    which must offer ``read_range`` as a method of its own: from Python 3.12 the protocol
    check that chooses streaming looks attributes up statically (inspect.getattr_static),
    and through ``__getattr__`` alone every checkout read in 8 MiB requests there."""
    store = open_remote(StoreConfig(url=f"s3://{s3_bucket}/opened", s3_endpoint_url=proxy.url))
    assert isinstance(store.backend, ConditionalWriteCheck)
    inspect.getattr_static(store.backend, "read_range")  # what isinstance consults on 3.12+
    src = write_tree(tmp_path / "src", {"a.bin": random.Random(3).randbytes(12 << 20)})
    store.publish("db", src)
    proxy.reset()
    store.checkout("db", dest=tmp_path / "out")
    assert read_tree(tmp_path / "out") == read_tree(src)
    packs = [r for r in proxy.reset() if "/packs/" in r.path]
    assert packs
    assert len(packs) == len({r.path for r in packs})  # one streamed GET a pack
    # a backend that does not stream is not made to look as if it did
    assert not isinstance(conditional_write_check(FileBackend(tmp_path / "f"), "f"), RangeStreamer)


def test_a_short_answer_is_refused(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = RemoteStore(_backend(proxy, s3_bucket), chunk_size=CHUNK, pack_target=16 * CHUNK)
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(8 * CHUNK)})
    remote.publish("db", src)
    real = S3Backend.read_range

    def short(
        self: S3Backend,
        key: str,
        span: tuple[int, int],
        buf: memoryview,
        take: Callable[[memoryview, int], int],
    ) -> int:
        return real(self, key, (span[0], span[1] - 1), buf, take)

    monkeypatch.setattr(S3Backend, "read_range", short)
    with pytest.raises(IntegrityError, match="short read"):
        remote.checkout("db", dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_answer_that_is_not_the_range_asked_for_is_the_servers_fault(
    proxy: CountingProxy, s3_bucket: str
) -> None:
    """A server that ignores Range answers 200 with the whole object: refused as an outage
    on every ranged read (not read as bytes of the range), accepted for the whole object."""
    backend = _backend(proxy, s3_bucket)
    data = os.urandom(50_000)
    backend.put("obj", data)
    reads: list[Callable[[], object]] = [
        lambda: _collect(backend, "obj", (100, 50_000), 1000),
        lambda: backend.get("obj", byte_range=(100, 200)),
        lambda: backend.get_into("obj", (0, 200), memoryview(bytearray(200))),
    ]
    for read in reads:
        proxy.ignore_range("obj")
        with pytest.raises(BackendUnavailableError, match="ignores Range"):
            read()
    proxy.ignore_range("obj", count=3)
    assert _collect(backend, "obj", (0, 50_000), 1000) == data
    assert backend.get("obj", byte_range=(0, 60_000)).data == data
    buf = bytearray(50_000)
    assert backend.get_into("obj", (0, 50_000), memoryview(buf)) == 50_000
    assert buf == data
    assert not [r for r in proxy.reset() if r.status not in (200, 206)]


def test_a_resumed_read_answered_with_the_whole_object_fails_the_checkout_as_an_outage(
    proxy: CountingProxy, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack body cut mid-way is asked for again from the middle; a server that then
    ignores Range must not fail the checkout as damaged data (IntegrityError)."""
    remote = RemoteStore(_backend(proxy, s3_bucket), chunk_size=CHUNK, pack_target=64 * CHUNK)
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(32 * CHUNK)})
    remote.publish("db", src)
    real, calls = s3body.BodyReader.readinto, [0]

    def breaks_once(self: s3body.BodyReader, view: memoryview) -> int:
        calls[0] += 1
        if calls[0] == 2:  # the re-request (from the first byte not held) gets it all
            proxy.ignore_range("/packs/")
            raise ResponseStreamingError(error=ConnectionResetError("cut"))
        return real(self, view)

    monkeypatch.setattr(fetch, "STREAM_BUFFER", 4 * CHUNK)  # several reads per pack
    monkeypatch.setattr(s3body.BodyReader, "readinto", breaks_once)
    proxy.reset()
    with pytest.raises(BackendUnavailableError, match="ignores Range"):
        remote.checkout("db", dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    packs = [r for r in proxy.reset() if "/packs/" in r.path and r.method == "GET"]
    assert len(packs) == 2  # the read and its resumption, refused: nothing else asked
