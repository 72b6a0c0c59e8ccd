"""Does an endpoint honour conditional writes?

Every publish and ref move relies on compare-and-swap (``If-None-Match: *`` and
``If-Match``). Some S3-compatible servers (s3rver, for one) ignore those headers:
there every CAS "succeeds" and concurrent publishes overwrite each other without
an error. :func:`probe_conditional_writes` writes a unique key, then tries a
second create and an update with a wrong ETag, both of which must be refused.

:class:`ConditionalWriteCheck` runs that probe before the first conditional
write of a process to each endpoint and bucket (the verdict is kept for the
process) and refuses with ConfigError when the endpoint ignores them; the
explicit opt-out is ``StoreConfig(unsafe_no_cas=True)`` /
``CHROMA_SNAPSHOTS_UNSAFE_NO_CAS=1``.
"""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING, Any

from chroma_snapshots.backends.base import Backend, ObjectMeta, PutMode
from chroma_snapshots.backends.bounded import DeadlineBackend
from chroma_snapshots.backends.wrapped import WrappedBackend
from chroma_snapshots.engine import keys
from chroma_snapshots.engine.deadline import current_deadline
from chroma_snapshots.errors import ConfigError, ConflictError, StorageTimeoutError

if TYPE_CHECKING:  # (the streaming machinery is imported by the checkouts that use it)
    from chroma_snapshots.engine.streaming import Take

# Not a valid snapshot name (those start alphanumeric), so probes never collide with data.
PROBE_DIR = keys.PROBES
OPT_OUT = "CHROMA_SNAPSHOTS_UNSAFE_NO_CAS=1"
_LOCK_WAIT = 60.0  # seconds a caller without a deadline waits for another thread's probe

_verdicts: dict[str, str | None] = {}  # scope -> None (honoured) or what was ignored
_scope_locks: dict[str, threading.Lock] = {}
_table_lock = threading.Lock()


def _accepted(backend: Backend, key: str, mode: PutMode) -> bool:
    try:
        backend.put(key, b"must be refused", mode=mode)
    except ConflictError:
        return False
    return True


def probe_conditional_writes(backend: Backend) -> str | None:
    """None if ``backend`` refuses a second create and a stale update of a fresh key,
    else which condition it ignored. The probe key is deleted either way."""
    key = f"{PROBE_DIR}/cas-{uuid.uuid4().hex}"
    try:
        meta = backend.put(key, b"probe", mode=PutMode.CREATE)
    except ConflictError:  # a key no one else names: our write landed, its answer was lost
        meta = backend.head(key)  # (a retry met it: 412); else the caller took this
        # ConflictError for its own write's (a pin "exists", then read back as missing)
    try:
        stale = PutMode.update("0" * 32 if meta.etag != "0" * 32 else "1" * 32)
        ignored = [
            header
            for header, mode in (("If-None-Match", PutMode.CREATE), ("If-Match", stale))
            if _accepted(backend, key, mode)
        ]
    finally:
        backend.delete(key)
    return f"ignores {' and '.join(ignored)}" if ignored else None


def _scope_lock(scope: str) -> threading.Lock:
    with _table_lock:
        return _scope_locks.setdefault(scope, threading.Lock())


def verdict(backend: Backend, scope: str) -> str | None:
    """:func:`probe_conditional_writes` for ``scope`` (endpoint and bucket), probed once per
    process; callers that arrive during the probe wait for it within their deadline."""
    with _table_lock:
        if scope in _verdicts:
            return _verdicts[scope]
    dl = current_deadline()
    lock = _scope_lock(scope)
    if not lock.acquire(timeout=dl.remaining() if dl is not None else _LOCK_WAIT):
        raise StorageTimeoutError(f"{scope}: waited too long for the conditional-write probe")
    try:
        with _table_lock:
            if scope in _verdicts:
                return _verdicts[scope]
        found = probe_conditional_writes(DeadlineBackend(backend, dl) if dl else backend)
        with _table_lock:
            _verdicts[scope] = found
        return found
    finally:
        lock.release()


def refusal(scope: str, problem: str) -> ConfigError:
    """The error a conditional write to an endpoint that ignores them raises."""
    return ConfigError(
        f"{scope}: the endpoint {problem} (conditional writes), so concurrent publishes and "
        "ref moves could overwrite each other silently; use an endpoint that honours them, "
        f"or, if only one writer ever publishes, opt out with {OPT_OUT} "
        "(StoreConfig(unsafe_no_cas=True))"
    )


class ConditionalWriteCheck(WrappedBackend):
    """``inner``, whose first CREATE or update in this process checks (once per ``scope``) that
    the endpoint honours conditional writes, and raises ConfigError if it does not."""

    def __init__(self, inner: Backend, scope: str) -> None:
        super().__init__(inner)
        self.scope = scope

    def __getattr__(self, name: str) -> Any:
        # settings, client, bucket, ... of the wrapped backend ("inner" itself: not set yet)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        if mode.kind != "overwrite":
            problem = verdict(self.inner, self.scope)
            if problem is not None:
                raise refusal(self.scope, problem)
        return self.inner.put(key, data, mode=mode)


class _StreamingCheck(ConditionalWriteCheck):
    """A :class:`ConditionalWriteCheck` over a backend that streams a range through a
    buffer (engine/streaming.py). The method is defined here, not left to ``__getattr__``:
    from Python 3.12 a protocol's ``isinstance`` looks attributes up statically, and a
    checkout through the plain wrapper read in 8 MiB requests instead of streaming."""

    def read_range(self, key: str, byte_range: tuple[int, int], buf: memoryview, take: Take) -> int:
        inner: Any = self.inner  # (one that streams: conditional_write_check)
        n: int = inner.read_range(key, byte_range, buf, take)
        return n


def conditional_write_check(inner: Backend, scope: str) -> ConditionalWriteCheck:
    """``inner`` behind a :class:`ConditionalWriteCheck` that offers what ``inner``
    offers: streamed range reads if it streams them."""
    if callable(getattr(inner, "read_range", None)):
        return _StreamingCheck(inner, scope)
    return ConditionalWriteCheck(inner, scope)


def unchecked(backend: Backend) -> Backend:
    """The backend below a :class:`ConditionalWriteCheck` (others unchanged)."""
    return backend.inner if isinstance(backend, ConditionalWriteCheck) else backend
