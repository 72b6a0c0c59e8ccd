"""How long work reports itself: progress callbacks and transfer counters."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from chroma_snapshots.engine.models import TransferStats

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``, called from worker threads as work completes."""


class StatsRecorder:
    """Thread-safe counters that become a frozen :class:`TransferStats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = TransferStats()

    def add(self, **delta: int) -> None:
        with self._lock:
            cur = self._stats
            self._stats = replace(cur, **{k: getattr(cur, k) + v for k, v in delta.items()})

    def at_least(self, **values: int) -> None:
        """Raise fields to ``values`` where they are lower (a peak, not a sum)."""
        with self._lock:
            cur = self._stats
            self._stats = replace(cur, **{k: max(getattr(cur, k), v) for k, v in values.items()})

    def freeze(self, seconds: float) -> TransferStats:
        with self._lock:
            return replace(self._stats, seconds=seconds)
