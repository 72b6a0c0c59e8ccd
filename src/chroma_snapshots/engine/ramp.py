"""How many reads a checkout runs at once: few at first, more only while more carry more.

Each stream is a thread receiving, hashing and writing; threads beyond what the link
needs cost CPU (GIL hand-offs, hashing in contention) and add nothing. On loopback two
streams carried a 1 GiB checkout as fast as eight for 0.26 CPU s less (benchmarks/
RESULTS.md); against S3, where one stream carries a fraction of the link, the rate grows
with each doubling. So, like TCP's slow start: begin at ``start``, double while a level's
rate beats the one before it by ``gain``, and settle at the last level that did (going
back down if the newest did not). The policy is here; the clock is injected, so tests
drive it without waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

START = 2
GAIN = 1.25  # a level must carry 25% more than the one below it to be worth its threads
WINDOW_SECONDS = 0.2  # a level is judged on at least this long ...
WINDOW_BYTES = 8 << 20  # ... and this many bytes per stream (one whole 8 MiB read each)
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
        """``n`` more bytes received; at the end of a level's window, judge the level."""
        if self.settled:
            return
        with self._cond:
            if self.settled or self._since is None:
                return
            self._bytes += n
            elapsed = self._clock() - self._since
            if elapsed < self._window or self._bytes < self.limit * WINDOW_BYTES:
                return
            self._judge(self._bytes / elapsed)

    def _judge(self, rate: float) -> None:
        below = self._below
        if below is not None and rate < below[1] * self._gain:
            self.limit, self.settled = below[0], True  # the extra streams did not pay
        elif self.limit >= self.most:
            self.settled = True
        else:
            self._below = (self.limit, rate)
            self.limit = min(self.most, 2 * self.limit)
            self.peak = max(self.peak, self.limit)
            self._cond.notify_all()
        self._since, self._bytes = self._clock(), 0
        if self.settled:
            log.debug("reads: %d at once (%.0f MB/s at %d)", self.limit, rate / 1e6, self.limit)

    def close(self) -> None:
        """End the gate: reads waiting for a slot, and later ones, get none."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
