"""Racing threads for tests: released together, each outcome kept, one time limit for all."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def race(n: int, fn: Callable[[int], T], timeout: float = 120.0) -> list[T | BaseException]:
    """Run ``fn(0)`` .. ``fn(n-1)`` in threads released together; each one's result or the
    exception it raised, in order. A thread still running after ``timeout`` fails the test."""
    barrier = threading.Barrier(n)
    outcomes: list[T | BaseException | None] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = fn(i)
        except BaseException as e:  # handed to the caller, which checks every outcome
            outcomes[i] = e

    # daemon threads and one time limit for all: a stuck backend fails the test, never hangs
    # the run (or the interpreter's exit)
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not stuck, f"threads {stuck} still running after {timeout} s"
    return outcomes  # type: ignore[return-value]  # every slot was filled by its thread


def raise_unexpected(
    outcomes: Sequence[object], expected: tuple[type[BaseException], ...] = ()
) -> None:
    """Re-raise the first outcome that is an exception not of an ``expected`` type."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, expected):
            raise outcome
