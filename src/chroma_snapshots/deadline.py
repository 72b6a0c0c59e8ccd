"""Deadlines: one monotonic budget shared by every wait inside an operation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Protocol, TypeVar

from .errors import StorageTimeoutError

T = TypeVar("T")


class LambdaContext(Protocol):
    """The one method of AWS Lambda's context object a deadline needs."""

    def get_remaining_time_in_millis(self) -> int: ...


class Deadline:
    """A point in (monotonic) time by which an operation must have finished.

    ``clock`` is injectable so tests can move time without sleeping.
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._end = clock() + seconds

    @classmethod
    def from_lambda_context(cls, ctx: LambdaContext, *, reserve: float = 5.0) -> Deadline:
        """The invocation's remaining time minus ``reserve`` seconds for clean-up."""
        return cls(max(0.0, ctx.get_remaining_time_in_millis() / 1000.0 - reserve))

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._end - self._clock())

    def expired(self) -> bool:
        """True once no time is left."""
        return self.remaining() <= 0.0

    def check(self, what: str) -> None:
        """Raise StorageTimeoutError naming ``what`` if the deadline has passed."""
        if self.expired():
            raise StorageTimeoutError(f"deadline exceeded during {what}")

    def child(self, seconds: float) -> Deadline:
        """A budget of at most ``seconds`` that also ends no later than this one."""
        return Deadline(min(seconds, self.remaining()), clock=self._clock)


DeadlineLike = Deadline | float | int | None


def as_deadline(value: DeadlineLike, default: float) -> Deadline:
    """A ``deadline=`` argument (Deadline, seconds, or None: ``default``) as a Deadline."""
    if isinstance(value, Deadline):
        return value
    return Deadline(default if value is None else float(value))


_CURRENT: ContextVar[Deadline | None] = ContextVar("chroma_snapshots_deadline", default=None)


def current_deadline() -> Deadline | None:
    """The deadline of the store operation this thread is working for, if any.

    Lets layers below the Backend interface (the hang guard) size their own
    budgets without every backend method taking a ``deadline`` argument.
    """
    return _CURRENT.get()


def within(deadline: Deadline, fn: Callable[[], T]) -> T:
    """Call ``fn`` with ``deadline`` as the current deadline (for pool threads)."""
    token = _CURRENT.set(deadline)
    try:
        return fn()
    finally:
        _CURRENT.reset(token)


def run_within(deadline: Deadline, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a daemon thread and wait at most until ``deadline``.

    On time-out the thread is abandoned (a daemon thread waiting on a socket or on
    the hang guard's pipe never blocks interpreter exit) and StorageTimeoutError
    names ``what``.
    """
    outcome: list[tuple[bool, object]] = []
    done = threading.Event()

    def target() -> None:
        try:
            outcome.append((True, within(deadline, fn)))
        except BaseException as e:  # handed to the caller below
            outcome.append((False, e))
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name=f"deadline:{what[:40]}").start()
    if not done.wait(deadline.remaining()):
        raise StorageTimeoutError(f"{what} did not finish within the deadline")
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]
