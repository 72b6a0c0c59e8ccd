"""An answer cut after its headers: the documented error, never a raw urllib3 one, and a
cut error answer is asked for again as a cut body is. botocore reads the body of an error
answer to a GET (a 404 for a ref not there yet) outside its own error handling, so a
connection reset or stall there escaped as urllib3's ProtocolError or ReadTimeoutError, and
failed a first publish, a checkout of a missing name, a prune (an independent review). The
calls whose answer botocore parses (a listing, a batch delete, a put) read it inside."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.cli.localserver import CREDENTIALS
from chroma_snapshots.errors import BackendUnavailableError, SnapshotError, StorageTimeoutError
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import write_tree
from chroma_snapshots.testing.faults import ScheduledFaults
from chroma_snapshots.testing.proxy import CountingProxy

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: 4000\r\n"
    b"x-amz-request-id: cut\r\n\r\n"
)
BODY = b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult><Name>b</Name>'


def _serve(sock: socket.socket, stop: threading.Event) -> None:
    """Answer each connection with headers and the start of a body, wait until the client
    surely read the headers, then reset the connection."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data and (more := conn.recv(65536)):
                data += more
            conn.sendall(HEAD + BODY)
            time.sleep(0.3)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def cutting_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(sock, stop), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(5)
    sock.close()


CALLS: dict[str, Callable[[S3Backend], object]] = {
    "list": lambda b: list(b.list("db/")),
    "list_dirs": lambda b: b.list_dirs("db/"),
    "delete_many": lambda b: b.delete_many(["db/a", "db/b"]),
    "put": lambda b: b.put("db/refs/latest", b"{}"),
    "get": lambda b: b.get("db/refs/latest"),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_an_answer_cut_after_its_headers_is_a_documented_error(
    cutting_server: str, call: str
) -> None:
    settings = S3Settings(endpoint_url=cutting_server, max_attempts=1, read_timeout=5)
    backend = S3Backend("bucket", "snaps", settings=settings)
    with pytest.raises(SnapshotError):
        CALLS[call](backend)


@pytest.mark.parametrize("kind", ["truncate", "stall"])
def test_a_404_whose_body_is_cut_is_asked_again(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path, kind: str
) -> None:
    # A first publish reads latest (absent: a 404 whose body botocore reads itself);
    # that body cut or stalled raised urllib3's error raw, unretried (an independent review).
    plan = ScheduledFaults({("GET ref", 0): kind}, stall_seconds=3.0)
    with CountingProxy(moto_server.endpoint_url, faults=plan) as proxy:
        settings = S3Settings(endpoint_url=proxy.url, read_timeout=1)
        store = RemoteStore(S3Backend(s3_bucket, "snaps", settings=settings))
        info = store.publish("db", write_tree(tmp_path / "src", {"a.bin": b"a" * 1000}))
        assert plan.counts[("GET ref", kind)] == 1  # the fault was met, and survived
    clean = RemoteStore(S3Backend(s3_bucket, "snaps", client=moto_server.client()))
    found = clean.read_ref("db")
    assert found is not None
    assert found[0].version == info.version


@pytest.mark.parametrize("kind", ["truncate", "stall"])
def test_a_404_cut_every_time_is_a_documented_error(
    moto_server: MotoServer, s3_bucket: str, kind: str
) -> None:
    plan = ScheduledFaults({("GET ref", n): kind for n in range(20)}, stall_seconds=3.0)
    with CountingProxy(moto_server.endpoint_url, faults=plan) as proxy:
        settings = S3Settings(endpoint_url=proxy.url, read_timeout=1)
        store = RemoteStore(S3Backend(s3_bucket, "snaps", settings=settings))
        with pytest.raises((BackendUnavailableError, StorageTimeoutError)):
            store.read_ref("db")


def test_a_lost_answer_to_the_conditional_write_probe_is_its_own_write(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probe's first create landed, its answer was a 500, botocore's retry met the probe
    # it had just written (412): the ConflictError reached the publish's first conditional
    # write (its pin), which read the pin back as missing: SnapshotNotFoundError (a review).
    from chroma_snapshots import open_store

    plan = ScheduledFaults({("PUT other", 0): "500"})
    with CountingProxy(moto_server.endpoint_url, faults=plan) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        store = open_store(f"s3://{s3_bucket}/p")
        info = store.publish("a", write_tree(tmp_path / "src", {"f": b"hello"}), deadline=15)
        assert plan.counts[("PUT other", "500")] == 1
        probes = [r for r in proxy.requests if "/_probes/" in r.path and r.method == "PUT"]
        assert probes[0].status == 200  # the fault fell on the probe's own first write
    clean = RemoteStore(S3Backend(s3_bucket, "p", client=moto_server.client()))
    found = clean.read_ref("a")
    assert found is not None
    assert found[0].version == info.version
