"""A view of a backend whose every call returns or raises within one deadline."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterator
from functools import partial

from chroma_snapshots.backends.base import Backend, GetResult, ObjectMeta, PutMode
from chroma_snapshots.engine.cleanup import clean_up
from chroma_snapshots.engine.deadline import Deadline, run_within
from chroma_snapshots.errors import SnapshotError

log = logging.getLogger(__name__)


class DeadlineBackend(Backend):
    """Delegates to ``inner``; a call still running when ``deadline`` passes is abandoned
    and raises StorageTimeoutError (botocore's retries and a hung mount alike)."""

    def __init__(self, inner: Backend, deadline: Deadline) -> None:
        self.inner = inner
        self.deadline = deadline

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        return run_within(
            self.deadline, f"get {key}", lambda: self.inner.get(key, byte_range=byte_range)
        )

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        return run_within(self.deadline, f"put {key}", lambda: self.inner.put(key, data, mode=mode))

    def head(self, key: str) -> ObjectMeta:
        return run_within(self.deadline, f"head {key}", lambda: self.inner.head(key))

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        found = run_within(
            self.deadline, _listing(prefix), lambda: builtins.list(self.inner.list(prefix))
        )
        return iter(found)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        return run_within(self.deadline, _listing(prefix), lambda: self.inner.list_dirs(prefix))

    def delete_many(self, keys: builtins.list[str]) -> None:
        run_within(self.deadline, f"delete {len(keys)} keys", lambda: self.inner.delete_many(keys))

    def delete(self, key: str) -> None:
        run_within(self.deadline, f"delete {key}", lambda: self.inner.delete(key))

    def sweep_temp(self, prefix: str, before: float, remove: bool = True) -> int:
        return run_within(
            self.deadline,
            f"sweep {prefix}",
            lambda: self.inner.sweep_temp(prefix, before, remove),
        )


def _listing(prefix: str) -> str:
    return f"list {prefix}" if prefix else "list of the store's top level"


TIDY_SECONDS = 30.0


def tidy(io: Backend, keys: builtins.list[str], what: str) -> None:
    """Delete ``keys``, objects of our own whose job is over (a pin, the record of a prune
    that deleted nothing), best effort: a failure is logged (they expire by themselves).
    Waits no longer than ``io``'s deadline (at least engine.cleanup.GRACE), but the request
    has a budget of its own (TIDY_SECONDS), so it is still sent after a timeout (requests
    of a call whose deadline passed are not: backends/s3errors.stop_at_deadline), and what
    is not done by then goes on in the background, where a process about to exit can wait
    for it (``wait_for_cleanups``; the CLI does). Removing our own finished objects late
    harms nothing; leaving them delays prunes and movers (a timed-out CLI prune's record,
    never removed, refused ref moves for 15 minutes)."""
    if not isinstance(io, DeadlineBackend):
        io.delete_many(keys)
        return
    own = DeadlineBackend(io.inner, Deadline(TIDY_SECONDS))
    clean_up(partial(_delete_logged, own, keys, what), io.deadline.remaining())


def _delete_logged(io: Backend, keys: builtins.list[str], what: str) -> None:
    try:
        io.delete_many(keys)
    except SnapshotError as e:
        log.warning("%s %s failed (they expire by themselves): %s", what, keys, e)
