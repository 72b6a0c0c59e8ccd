"""Dropping a checkout's written data from the page cache behind the writer.

A materialization writes a whole version at once; kept, its pages fill the page cache
with as many bytes as the version (3 GiB for a 3 GiB snapshot). On a machine whose
memory is short (a Lambda sized for its reader) that is reclaim work at every write, and
on a VM whose host takes back freed memory (Firecracker, which runs Lambda, and the
benchmark VM: free page reporting) every page newly filled is a fault on the host first:
on the benchmark VM a cold 3 GiB checkout spent 4.2-12.5 system seconds keeping its
pages and 2.6-2.9 dropping them (benchmarks/RESULTS.md). Dropped, the pages a checkout
frees are the ones it fills next. What a reader then reads comes from the disk instead.

``posix_fadvise(POSIX_FADV_DONTNEED)`` starts the writeback of a file's dirty pages and
drops those already clean: called at every ``STEP`` bytes written to a file, it drops
what the call before sent to the disk. A finished file is kept open (``KEEP`` of them at
most) until a few more are done, for a last call once its tail is clean.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter, deque

# Bytes written to a file between two calls (two STEPs stay cached a file). Small enough
# that the pages freed are filled again soon, before the VM hands them back to its host:
# 8 MiB against 32 on a cold 3 GiB checkout, 4 ABBA pairs, system -0.91 s and wall -1.89
# (median, lower in 3 of 4), and a reader of every file after it -0.73 CPU s (4 of 4);
# writing alone, 0.58-0.65 system s/GiB against 0.56-1.04 (benchmarks/page_cost.py; in
# an earlier ad hoc run of the same writes 0.51-0.61 against 1.56-2.07). RESULTS.md.
STEP = 8 << 20
KEEP = 4  # finished files held open for their last call: descriptors, so a few
SMALLEST = 1 << 20  # smaller files are left to the kernel: a call each costs more than it saves


class DropBehind:
    """Which descriptors to advise when, for one materialization (thread-safe).

    The caller owns the descriptors: ``wrote`` only advises, and ``finished`` and
    ``drain`` hand back the descriptors to close once their last call is made."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: Counter[int] = Counter()  # descriptor -> bytes since its last call
        self._done: deque[int] = deque()  # finished files not yet closed, oldest first

    def wrote(self, fd: int, size: int) -> None:
        """``size`` more bytes were written through ``fd``."""
        with self._lock:
            self._since[fd] += size
            due = self._since[fd] >= STEP
            if due:
                self._since[fd] = 0
        if due:
            advise(fd)

    def finished(self, fd: int) -> list[int]:
        """``fd``'s file is complete: start its tail's writeback and keep it open; returns
        the descriptors now to close (the oldest kept, past ``KEEP``), their last call made."""
        advise(fd)
        with self._lock:
            self._since.pop(fd, None)
            self._done.append(fd)
            out = [self._done.popleft() for _ in range(len(self._done) - KEEP)]
        for old in out:
            advise(old)
        return out

    def drain(self) -> list[int]:
        """Every descriptor still kept, its last call made, for the caller to close."""
        with self._lock:
            out, self._done = list(self._done), deque()
            self._since.clear()
        for fd in out:
            advise(fd)
        return out


def advise(fd: int) -> None:
    """Start writing ``fd``'s dirty pages back and drop its clean ones from the cache.
    A hint: a file system that refuses it (EINVAL, ESPIPE) leaves the pages cached, which
    is what not asking does, so its error is not the checkout's."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
