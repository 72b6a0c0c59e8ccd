"""Reading a GET's body straight from the socket into the caller's buffer (S3Backend)."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ReadTimeoutError, ResponseStreamingError


def direct_reader(body: Any) -> Callable[[memoryview], int] | None:
    """A reader of a GET's body straight from the socket into the caller's buffer: one
    copy, no temporary objects (urllib3's readinto allocates a bytes object per piece and
    copies it again: with its per-call overhead ~0.3 CPU s per GiB, benchmarks/RESULTS.md).
    Only for a body http.client reads as it came (not content-encoded); otherwise None and
    the caller reads through botocore. A stall or a cut raises botocore's own errors, so
    the caller's retry and error mapping stay the same."""
    raw: Any = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if not isinstance(fp, http.client.HTTPResponse) or raw.headers.get("content-encoding"):
        return None

    def read(view: memoryview) -> int:
        got, clean = 0, False
        try:
            while got < len(view):
                n = fp.readinto(view[got:])
                if not n:
                    if fp.length:  # http.client returns 0 when the peer hangs up mid-body
                        raise http.client.IncompleteRead(b"", fp.length)
                    break  # the whole answer, shorter than asked: the caller judges it
                got += n
            clean = fp.isclosed()  # the whole body read: the connection can be reused
        except TimeoutError as e:
            raise ReadTimeoutError(endpoint_url=str(getattr(raw, "url", "")), error=e) from e
        except (OSError, http.client.HTTPException) as e:
            raise ResponseStreamingError(error=e) from e
        finally:
            if not clean:
                raw.close()  # never reuse a connection with unread or broken data
            raw.release_conn()
        return got

    return read


class BodyReader:
    """A GET's body read piece by piece: straight from the socket where http.client reads
    it as it came (as :func:`direct_reader`), else through botocore. Errors are
    botocore's own (a stall ReadTimeoutError, a cut ResponseStreamingError)."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self._raw: Any = getattr(body, "_raw_stream", None)
        fp: Any = getattr(self._raw, "_fp", None)
        plain = isinstance(fp, http.client.HTTPResponse) and not fp.getheader("content-encoding")
        self._fp: http.client.HTTPResponse | None = fp if plain else None

    def readinto(self, view: memoryview) -> int:
        """Up to ``len(view)`` bytes (fewer is not the end); 0 only at the body's end."""
        if self._fp is None:
            return int(self._body.readinto(view[: 1 << 20]))  # see get_into
        try:
            n = self._fp.readinto(view)
            if not n and self._fp.length:  # 0 when the peer hangs up mid-body
                raise http.client.IncompleteRead(b"", self._fp.length)
            return int(n)
        except TimeoutError as e:
            raise ReadTimeoutError(endpoint_url=str(getattr(self._raw, "url", "")), error=e) from e
        except (OSError, http.client.HTTPException) as e:
            raise ResponseStreamingError(error=e) from e

    def close(self) -> None:
        """Give the connection back, closed unless the whole body was read."""
        if self._fp is None:
            self._body.close()
            return
        if not self._fp.isclosed():
            self._raw.close()  # never reuse a connection with unread or broken data
        self._raw.release_conn()
