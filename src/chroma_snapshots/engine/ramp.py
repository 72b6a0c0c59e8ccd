"""How many reads a checkout runs at once: few at first, more only while more carry more.

Each stream is a thread receiving, hashing and writing; threads beyond what the link
needs cost CPU (GIL hand-offs, hashing in contention) and add nothing. On loopback two or
four streams carried a 1 GiB checkout as fast as eight for 0.2 CPU s less (benchmarks/
RESULTS.md); against S3, where one stream carries a fraction of the link, the rate grows
with each doubling. So, like TCP's slow start: begin at ``start``, double while a level's
rate beats the one before it by ``gain``, and settle at the last level that did (going
back down if the newest did not). Settled, it keeps watching: two windows in a row that
carry ``gain`` times less than the level did when it settled (the link got slower per
stream) start the doubling again from there. The policy is here; the clock is injected,
so tests drive it without waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# From 4, not 2: behind streams paced like S3's, from 2 cost a 256 MiB checkout 0.16-0.21 s
# more than every read at once, from 4 0.05-0.10 s; on loopback 2 saved 0.12 CPU s/GiB
# more than 4 (benchmarks/RESULTS.md). A window of 0.1 s and 2 MiB a stream: 8 MiB ones
# cost 0.4-0.8 s there.
START = 4
GAIN = 1.25  # a level must carry 25% more than the one below it to be worth its threads
WINDOW_SECONDS = 0.1  # a level is judged on at least this long ...
WINDOW_BYTES = 2 << 20  # ... and this many bytes per stream
log = logging.getLogger(__name__)


class Ramp:
    """A gate of ``limit`` slots that grows from ``start`` towards ``most`` as the bytes
    reported with :meth:`add` show that more streams carry more. :meth:`close` ends it:
    reads still waiting for a slot are then turned away (their call has ended)."""

    def __init__(
        self,
        most: int,
        *,
        start: int = START,
        gain: float = GAIN,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.most = most
        self.limit = self.peak = min(start, most)  # peak: the most slots ever open
        self.settled = self.limit >= most  # no level left to try
        self._kept = 0.0  # settled: the rate the level carried then
        self._low: list[float] = []  # settled: the windows in a row since that fell short
        self._gain, self._window, self._clock = gain, window, clock
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False
        self._below: tuple[int, float] | None = None  # the level tried before, its rate
        self._since: float | None = None  # this level's window: from the first read on
        self._bytes = 0

    @contextmanager
    def slot(self) -> Iterator[bool]:
        """Hold one of the ``limit`` slots for a read (waiting for one to free): True; or
        False, holding none, once the gate is closed: the read must not start. (Not an
        exception: the error that ended the reads is the one their caller must see.)"""
        with self._cond:
            while not self._closed and self._active >= self.limit:
                self._cond.wait()
            granted = not self._closed
            if granted:
                self._active += 1
                if self._since is None:
                    self._since = self._clock()
        if not granted:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify()

    def add(self, n: int) -> None:
        """``n`` more bytes received; at the end of a window, judge the level."""
        with self._cond:
            if self._since is None:
                return
            self._bytes += n
            elapsed = self._clock() - self._since
            if elapsed < self._window or self._bytes < self.limit * WINDOW_BYTES:
                return
            rate = self._bytes / elapsed
            self._since, self._bytes = self._clock(), 0
            if self.settled:
                self._watch(rate)
            else:
                self._judge(rate)

    def _judge(self, rate: float) -> None:
        below = self._below
        if below is not None and rate < below[1] * self._gain:
            self._settle(*below)  # the extra streams did not pay
        elif self.limit >= self.most:
            self._settle(self.limit, rate)
        else:
            self._grow(rate)

    def _grow(self, rate: float) -> None:
        self._below, self.settled = (self.limit, rate), False
        self.limit = min(self.most, 2 * self.limit)
        self.peak = max(self.peak, self.limit)
        self._cond.notify_all()

    def _settle(self, limit: int, rate: float) -> None:
        self.limit, self.settled, self._kept, self._low = limit, True, rate, []
        log.debug("reads: %d at once (%.0f MB/s)", limit, rate / 1e6)

    def _watch(self, rate: float) -> None:
        """Settled: two windows in a row this far below the settled rate start the
        doubling again (one may be a pause of the server's; two are the link)."""
        if rate * self._gain >= self._kept or self.limit >= self.most:
            self._low = []
            return
        self._low.append(rate)
        if len(self._low) == 2:
            self._grow(sum(self._low) / 2)

    def close(self) -> None:
        """End the gate: reads waiting for a slot, and later ones, get none."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
