"""A view of a backend whose every call returns or raises within one deadline."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from chroma_snapshots.backends.base import Backend
from chroma_snapshots.backends.wrapped import WrappedBackend, keys_named
from chroma_snapshots.engine.cleanup import clean_up
from chroma_snapshots.engine.deadline import Deadline, run_within
from chroma_snapshots.errors import SnapshotError

log = logging.getLogger(__name__)
T = TypeVar("T")


class DeadlineBackend(WrappedBackend):
    """Delegates to ``inner``; a call still running when ``deadline`` passes is abandoned
    and raises StorageTimeoutError (botocore's retries and a hung mount alike)."""

    def __init__(self, inner: Backend, deadline: Deadline) -> None:
        super().__init__(inner)
        self.deadline = deadline

    def around(self, op: str, keys: tuple[str, ...], call: Callable[[], T]) -> T:
        return run_within(self.deadline, f"{op} {keys_named(keys)}", call)

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        # through get: a call abandoned at the deadline must not write into ``buf`` later
        return Backend.get_into(self, key, byte_range, buf)

    def close(self) -> None:
        """Nothing: a view for one operation; the store closes its backend."""


TIDY_SECONDS = 30.0
TIDY_WAIT = 1.0  # what a call that succeeded waits for its tidying: a healthy store takes ms


def tidy(io: Backend, keys: builtins.list[str], what: str) -> None:
    """Delete ``keys``, objects of our own whose job is over (a pin, the record of a prune
    that deleted nothing), best effort: a failure is logged (they expire by themselves).
    Waits no longer than ``io``'s deadline, nor than TIDY_WAIT (at least
    engine.cleanup.GRACE): the call's work is done, and a publish that moved its ref waited
    out its whole deadline on a hung delete (an independent review). The request
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
    clean_up(partial(_delete_logged, own, keys, what), min(io.deadline.remaining(), TIDY_WAIT))


def _delete_logged(io: Backend, keys: builtins.list[str], what: str) -> None:
    try:
        io.delete_many(keys)
    except SnapshotError as e:
        log.warning("%s %s failed (they expire by themselves): %s", what, keys, e)
