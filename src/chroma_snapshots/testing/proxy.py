"""A loopback HTTP proxy in front of a local S3 server that records every request.

Tests point boto3 at the proxy and count what the server really received
(method, path, query, status, response bytes) instead of patching our code.
``stall`` makes chosen responses stop mid-body, like a server or network that
stops sending without closing the connection; a :class:`~.faults.FaultPlan` damages
requests at random (503, 500, reset, stall, truncated body, latency), seeded.
``strip_headers`` drops request headers before forwarding, e.g. ``If-None-Match`` and
``If-Match`` to play a server that ignores conditional writes (as s3rver does);
``ignore_range`` makes chosen ranged GETs answer 200 with the whole object, as a server
or proxy that ignores Range does. ``stream_mbps`` paces every response body to that many
MB/s: one connection then carries a fraction of what several do, as against S3.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from chroma_snapshots.testing.faults import FaultPlan

_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "content-length",
}


_PACE_PIECE = 64 << 10  # a paced body goes out in pieces this size


@dataclass(frozen=True)
class Recorded:
    """One request the proxy forwarded."""

    method: str
    path: str
    status: int
    response_bytes: int
    request_bytes: int = 0

    @property
    def key(self) -> str:
        """The object key part of the path (bucket stripped), without the query."""
        return self.path.split("?", 1)[0].split("/", 2)[-1]


class _Stall:
    def __init__(self, path_contains: str, count: int, after_bytes: int, hold: float) -> None:
        self.path_contains, self.left = path_contains, count
        self.after_bytes, self.hold = after_bytes, hold


@contextmanager
def closed_endpoint() -> Iterator[str]:
    """A loopback URL where nothing answers (connections are refused) until the block ends.

    The port is bound, never listened on, and held: no other process can take it meanwhile,
    as it could take the port of a server that was stopped."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


class CountingProxy:
    """Forwards HTTP to ``upstream`` (e.g. a MotoServer's endpoint) and records each request."""

    def __init__(
        self,
        upstream: str,
        faults: FaultPlan | None = None,
        strip_headers: tuple[str, ...] = (),
        stream_mbps: float | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        self.faults, self.stream_mbps = faults, stream_mbps
        self._drop = _HOP | {h.lower() for h in strip_headers}
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._stalls: list[_Stall] = []
        self._whole: dict[str, int] = {}  # path part: ranged GETs left to answer whole
        self._released = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stall(
        self, path_contains: str, *, count: int = 1, after_bytes: int = 1024, hold: float = 30.0
    ) -> None:
        """Make the next ``count`` GET responses whose path contains ``path_contains`` send
        ``after_bytes`` of the body and then nothing for ``hold`` seconds (or until ``stop``)."""
        with self._lock:
            self._stalls.append(_Stall(path_contains, count, after_bytes, hold))

    def ignore_range(self, path_contains: str, *, count: int = 1) -> None:
        """Forward the next ``count`` ranged GETs whose path contains ``path_contains``
        without their Range header: the server answers 200 with the whole object."""
        with self._lock:
            self._whole[path_contains] = self._whole.get(path_contains, 0) + count

    def _take_whole(self, method: str, path: str, headers: dict[str, str]) -> bool:
        if method != "GET" or not any(k.lower() == "range" for k in headers):
            return False
        with self._lock:
            for part, left in self._whole.items():
                if part in path and left > 0:
                    self._whole[part] = left - 1
                    return True
        return False

    def _take_stall(self, method: str, path: str) -> _Stall | None:
        with self._lock:
            for s in self._stalls:
                if method == "GET" and s.path_contains in path and s.left > 0:
                    s.left -= 1
                    return s
        return None

    def reset(self) -> list[Recorded]:
        """Return the requests so far and start counting afresh."""
        with self._lock:
            seen, self.requests = self.requests, []
        return seen

    def _record(self, r: Recorded) -> None:
        with self._lock:
            self.requests.append(r)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: object) -> None:
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                fault = proxy.faults.draw(self.command, self.path) if proxy.faults else None
                if fault == "503":
                    return self._error(503, "SlowDown")
                if fault == "reset":
                    return self._reset()
                if fault == "latency" and proxy.faults is not None:
                    # held, then forwarded; ``stop`` ends the hold (forwarded at once)
                    proxy._released.wait(proxy.faults.latency_seconds)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy._drop}
                if proxy._take_whole(self.command, self.path, headers):
                    headers = {k: v for k, v in headers.items() if k.lower() != "range"}
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                # record before answering, so a client that saw the answer sees the count
                proxy._record(Recorded(self.command, self.path, resp.status, len(data), len(body)))
                if fault == "500":  # the server did the work; the client hears it failed
                    return self._error(500, "InternalError")
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                # HEAD keeps the object's length; everything else sends what it read
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                stall = proxy._take_stall(self.command, self.path)
                if stall is None and fault == "stall" and proxy.faults is not None:
                    stall = _Stall("", 1, len(data) // 2, proxy.faults.stall_seconds)
                if stall is not None:
                    self.wfile.write(data[: stall.after_bytes])
                    self.wfile.flush()
                    proxy._released.wait(stall.hold)  # send nothing more, keep the socket open
                    self.close_connection = True
                elif fault == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                elif self.command != "HEAD":
                    self._send(data)
                return None

            def _send(self, data: bytes) -> None:
                """The body, paced to ``stream_mbps`` if set (``stop`` ends the pacing)."""
                if proxy.stream_mbps is None:
                    self.wfile.write(data)
                    return
                start, view = time.monotonic(), memoryview(data)
                for at in range(0, len(data), _PACE_PIECE):
                    self.wfile.write(view[at : at + _PACE_PIECE])
                    due = start + (at + _PACE_PIECE) / (proxy.stream_mbps * 1e6)
                    proxy._released.wait(max(0.0, due - time.monotonic()))

            def _error(self, status: int, code: str) -> None:
                xml = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            def _reset(self) -> None:
                """Drop the connection with a TCP RST (linger 0), as a failing network does."""
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
