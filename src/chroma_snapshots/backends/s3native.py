"""A checkout's ranged GETs through awscrt's native HTTP client (the ``crt`` extra).

Only the receiving moves to native code: botocore still resolves each object's URL
(endpoint, addressing style, key encoding), the native client signs it (SigV4, with
botocore's credentials) and receives the answer, and every answer goes to the same
``take`` as botocore's (each chunk verified, then placed). Receiving in C saves 0.3-0.5
CPU s per GiB of interpreter time (benchmarks/RESULTS.md).

Waiting is ours, not the client's: an attempt is waited for at most ``read_timeout``
seconds and never past the current deadline, then cancelled, and asked again
(``body_attempts``) or failed. A cancelled attempt's late callbacks do nothing: each
holds its attempt's lock while it hands bytes on, and a stopped attempt is marked dead
under that lock. Bytes are handed on from buffers of the attempt's own, never the
worker's, so an abandoned attempt can fill nothing another read uses.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from botocore.credentials import Credentials
from botocore.exceptions import ClientError, NoCredentialsError

from chroma_snapshots.backends.base import past_end, range_refused
from chroma_snapshots.backends.options import S3_READERS
from chroma_snapshots.backends.s3errors import range_mismatch, wrap_error
from chroma_snapshots.engine.deadline import current_deadline
from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    SnapshotError,
    StorageTimeoutError,
)

Take = Callable[[memoryview, int], int]
# One attempt's answer is held whole by the native client before it is handed on (it
# buffers a plain GET's body), so a read is at most this: 8 workers hold 64 MiB.
NATIVE_MAX_READ = 8 << 20


def wants_native(reader: str) -> bool:
    """Whether a checkout's pack reads go through the native client: ``reader`` is
    "botocore", "crt" (ConfigError without awscrt) or "auto" (crt if awscrt is installed)."""
    import importlib.util

    if reader not in S3_READERS:
        raise ConfigError(f"S3 reader {reader!r} is not one of {', '.join(S3_READERS)}")
    there = reader != "botocore" and importlib.util.find_spec("awscrt") is not None
    if reader == "crt" and not there:
        raise ConfigError(
            "the S3 reader crt needs awscrt: pip install 'chroma-snapshots[crt]' (or choose "
            "the reader botocore)"
        )
    return there


class Feed:
    """Bytes ``[start, end)`` of an object arriving in order, in pieces of any size,
    handed to ``take`` as in :meth:`S3Backend.read_range`: each piece directly, and a
    chunk cut by a piece's end completed in a buffer of its own (``buffer`` bytes)."""

    def __init__(self, take: Take, start: int, end: int, buffer: int) -> None:
        self.take, self.end, self.size = take, end, buffer
        self.pos = start  # the first byte not yet taken
        self.held = bytearray()  # bytes from pos on: a chunk cut by a piece's end

    @property
    def received(self) -> int:
        return self.pos + len(self.held)

    def add(self, piece: memoryview) -> None:
        while piece:
            if not self.held:  # the usual case: the whole piece at once
                self._hand(piece)
                return
            n = min(len(piece), self.size - len(self.held))  # complete the cut chunk
            self.held += piece[:n]
            piece = piece[n:]
            if len(self.held) == self.size or self.received == self.end:
                self._hand(memoryview(bytes(self.held)))

    def _hand(self, view: memoryview) -> None:
        """``take`` what is whole in ``view``; hold the rest (one cut chunk at most)."""
        used = self.take(view, self.pos)
        if not 0 <= used <= len(view):
            raise IntegrityError(f"took {used} of {len(view)} bytes")  # a bug, not damage
        if used == 0 and len(view) >= self.size:
            raise IntegrityError("a chunk larger than a read buffer")
        self.pos += used
        self.held = bytearray(view[used:])


@dataclass
class _Answer:
    """What the native client said about one attempt."""

    status: int | None = None
    headers: dict[str, str] | None = None
    error: BaseException | None = None
    error_body: bytes | None = None


class Attempt:
    """One GET of bytes ``[first, end)``; its callbacks feed ``feed`` while it is live."""

    def __init__(self, key: str, first: int, end: int, feed: Feed) -> None:
        self.key, self.first, self.end, self.feed = key, first, end, feed
        self.lock = threading.Lock()
        self.live = True
        self.failure: BaseException | None = None  # raised by take, or a refused answer
        self.answer = _Answer()
        self.request: Any = None

    def on_headers(self, status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
        with self.lock:
            self.answer.status = status_code
            self.answer.headers = {k.lower(): v for k, v in headers}
            if not self.live or status_code >= 300:
                return
            h = self.answer.headers
            told = h.get("content-range", "")
            wrong = range_mismatch(
                self.key,
                (self.first, self.end),
                status_code,
                int(h.get("content-length", "-1")),
                told,
            )
            if wrong is not None:
                self._fail(wrong)

    def on_body(self, chunk: Any, offset: int, **_: Any) -> None:
        with self.lock:
            if not self.live:
                return
            try:
                self.feed.add(memoryview(chunk))
            except BaseException as e:  # carried to the waiting worker
                self._fail(e)

    def on_done(self, error: BaseException | None = None, **kw: Any) -> None:
        self.answer.error = error
        self.answer.error_body = kw.get("error_body")
        if kw.get("status_code") is not None:
            self.answer.status = kw["status_code"]

    def _fail(self, e: BaseException) -> None:
        self.failure, self.live = e, False
        if self.request is not None:
            self.request.cancel()

    def stop(self, budget: float) -> bool:
        """Mark the attempt dead and cancel it; False if a callback still running did not
        finish within ``budget`` seconds (it then hands on nothing more either)."""
        got = self.lock.acquire(timeout=max(budget, 0.0))
        self.live = False
        if got:
            self.lock.release()
        if self.request is not None:
            self.request.cancel()
        return got


class NativeReader:
    """Ranged GETs of one bucket through an awscrt S3 client, for :meth:`read_range`."""

    def __init__(
        self,
        botocore_client: Any,
        read_timeout: float,
        attempts: int,
        connect_timeout: float,
        max_attempts: int,
        credentials: Credentials | None,
    ) -> None:
        from awscrt import auth, io, s3

        if credentials is None:
            raise wrap_error(NoCredentialsError(), "get", "")
        self.botocore = botocore_client
        self.read_timeout, self.attempts = read_timeout, attempts
        endpoint = str(botocore_client.meta.endpoint_url)
        tls = s3.S3RequestTlsMode.DISABLED if endpoint.startswith("http://") else None

        def frozen() -> Any:
            got = credentials.get_frozen_credentials()
            return auth.AwsCredentials(got.access_key, got.secret_key, got.token)

        loops = io.EventLoopGroup()
        self.client = s3.S3Client(
            bootstrap=io.ClientBootstrap(loops, io.DefaultHostResolver(loops)),
            region=botocore_client.meta.region_name or "us-east-1",
            tls_mode=tls,
            credential_provider=auth.AwsCredentialsProvider.new_delegate(frozen),
            connect_timeout_ms=max(1, int(connect_timeout * 1000)),
            retry_config=s3.S3RetryConfig(
                max_retries=max(1, max_attempts - 1),
                backoff_scale_factor_ms=100,
                max_backoff_secs=5,
            ),
        )

    def read_range(
        self,
        bucket: str,
        full_key: str,
        key: str,
        byte_range: tuple[int, int],
        take: Take,
        buffer: int,
    ) -> int:
        """As S3Backend.read_range: stream ``byte_range`` of ``full_key`` into ``take``;
        an attempt that does not finish within ``read_timeout`` is asked again from the
        first byte not received. Returns the bytes received."""
        start, end = byte_range
        feed, tries = Feed(take, start, end, buffer), 0
        while feed.received < end:
            first = feed.received
            attempt = Attempt(key, first, end, feed)
            try:
                if self._run(bucket, full_key, attempt):
                    return feed.received - start  # a shorter answer: the caller judges
            except StorageTimeoutError:
                tries += 1
                if tries >= self.attempts:
                    raise
        return end - start

    def _run(self, bucket: str, full_key: str, attempt: Attempt) -> bool:
        """Send ``attempt`` and wait for it; True if the object ended before ``end``."""
        from awscrt import http, s3

        url = urlsplit(
            self.botocore.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": full_key}, ExpiresIn=60
            )
        )
        headers = [("Host", url.netloc), ("Range", f"bytes={attempt.first}-{attempt.end - 1}")]
        request = http.HttpRequest("GET", url.path, http.HttpHeaders(headers))
        dl = current_deadline()
        budget = self.read_timeout if dl is None else min(self.read_timeout, dl.remaining())
        attempt.request = self.client.make_request(
            type=s3.S3RequestType.DEFAULT,
            operation_name="GetObject",
            request=request,
            on_headers=attempt.on_headers,
            on_body=attempt.on_body,
            on_done=attempt.on_done,
        )
        futures.wait([attempt.request.finished_future], timeout=budget)  # on_done tells how
        if not attempt.request.finished_future.done():
            stopped = attempt.stop(dl.remaining() if dl is not None else 1.0)
            late = dl is not None and (dl.expired() or not stopped)
            why = "the deadline passed" if late else f"no answer within {self.read_timeout:g} s"
            raise StorageTimeoutError(f"get {attempt.key}: S3 timed out ({why})")
        with attempt.lock:
            attempt.live = False
        if attempt.failure is not None:
            raise attempt.failure
        if attempt.answer.error is not None:
            raise self._error(attempt)
        return attempt.feed.received < attempt.end

    def _error(self, attempt: Attempt) -> SnapshotError:
        """The documented error for what the native client reported."""
        a, key = attempt.answer, attempt.key
        if a.status is not None and a.status >= 300:
            code, message = _parsed(a.error_body)
            said: Any = {
                "Error": {"Code": code, "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": a.status},
            }
            err = ClientError(said, "GetObject")
            if range_refused(err):
                return past_end(key, attempt.first)
            return wrap_error(err, "get", key)
        name = getattr(a.error, "name", type(a.error).__name__)
        if "TIMEOUT" in str(name).upper():
            return StorageTimeoutError(f"get {key}: S3 timed out ({name})")
        endpoint = self.botocore.meta.endpoint_url
        return BackendUnavailableError(f"get {key}: the S3 endpoint {endpoint} failed ({name})")


def _parsed(body: bytes | None) -> tuple[str, str]:
    """(Code, Message) of an S3 error body; empty strings if it is not one."""
    try:
        root = ET.fromstring(body or b"")
    except ET.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""
