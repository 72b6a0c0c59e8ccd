"""One retry policy for every loop that tries again.

Policy (how many attempts, how long to wait between them, when to give up) is a frozen
value; the mechanism (:meth:`RetryPolicy.call`) runs a function under it. The clock, the
sleep and the random source are injectable, so tests neither wait nor depend on luck.
Modelled on tenacity's split of stop/wait/retry from the loop that applies them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``attempts`` tries, waiting ``base * 2**n`` seconds (at most ``cap``) between
    them, with full jitter: a uniformly random wait up to that bound, so that writers who
    lost the same race do not collide again in step. ``attempts=math.inf`` retries until
    the time given to :meth:`call` runs out."""

    attempts: float = 5
    base: float = 0.05
    cap: float = 2.0
    jitter: bool = True
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    rand: Callable[[], float] = field(default=random.random, repr=False)

    def __post_init__(self) -> None:
        whole = self.attempts == math.inf or (
            isinstance(self.attempts, int) and not isinstance(self.attempts, bool)
        )
        finite = all(math.isfinite(x) for x in (self.base, self.cap))
        if not (whole and self.attempts >= 1 and finite and self.base >= 0 and self.cap >= 0):
            raise ValueError(f"invalid retry policy {self!r}")

    def with_(self, **changes: object) -> RetryPolicy:
        """A copy with some fields changed (``policy.with_(attempts=3)``)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def waits(self) -> Iterator[float]:
        """The wait before each retry (one fewer than the attempts)."""
        n = 0
        while n + 1 < self.attempts:
            bound = min(self.cap, self.base * 2.0 ** min(n, 64))  # 2**1024 overflows a float
            yield bound * self.rand() if self.jitter else bound
            n += 1

    def call(
        self,
        fn: Callable[[int], T],
        *,
        retry_on: tuple[type[BaseException], ...],
        within: float = math.inf,
        on_retry: Callable[[int, BaseException], None] | None = None,
    ) -> T:
        """``fn(attempt)`` (attempts count from 1) until it returns. An exception of a
        ``retry_on`` type is retried while attempts remain and the next try would start
        within ``within`` seconds of now (on the policy's clock); otherwise it is raised,
        as is any other exception at once. ``on_retry(attempt, error)`` sees each retry."""
        if not within >= 0:  # NaN included: it would switch the limit off
            raise ValueError(f"retry time limit must be >= 0 seconds, not {within!r}")
        end = self.clock() + within
        waits = self.waits()
        attempt = 1
        while True:
            try:
                return fn(attempt)
            except retry_on as e:
                wait = next(waits, None)
                if wait is None or self.clock() + wait >= end:
                    raise
                if on_retry is not None:
                    on_retry(attempt, e)
            self.sleep(wait)
            attempt += 1


IMMEDIATE = RetryPolicy(attempts=3, base=0.0, jitter=False)
"""Try again at once: a cut response body, an object that changed while being read."""
