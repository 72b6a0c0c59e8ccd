"""Small fault injectors for tests of the hang guard and deadlines."""

from __future__ import annotations

import time
from pathlib import Path

from chroma_snapshots.errors import IntegrityError


class Sleeper:
    """A picklable target for MountGuard tests: it answers, fails, or blocks on demand.

    ``probe`` blocks while the file ``blocked`` exists, so a test can make the
    "mount" recover without any shared memory.
    """

    def __init__(self, blocked: Path) -> None:
        self.blocked = blocked

    def echo(self, value: object) -> object:
        return value

    def fail(self) -> None:
        raise IntegrityError("injected failure")

    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "woke"

    def probe(self) -> None:
        while self.blocked.exists():
            time.sleep(0.01)


FAULT_KINDS = ("503", "500", "reset", "stall", "truncate", "latency")


def request_type(method: str, path: str) -> str:
    """'GET pack', 'PUT ref', 'LIST', ... for counting faults per kind of request."""
    if "list-type" in path or (method == "GET" and path.rstrip("/").count("/") <= 1):
        return "LIST"
    if "uploads" in path or "uploadId" in path:
        return f"{method} multipart"
    if "delete" in path and method == "POST":
        return "DELETE batch"
    for part, label in (("/packs/", "pack"), ("/manifests/", "manifest"), ("/refs/", "ref")):
        if part in path:
            return f"{method} {label}"
    return f"{method} other"


class FaultPlan:
    """Which requests a fault proxy damages, and how: each request gets a fault with
    probability ``rate``, its kind drawn uniformly from ``kinds``; same seed, same sequence.

    Kinds: ``503`` (SlowDown, not forwarded), ``500`` (forwarded, then InternalError: the
    write may have happened), ``reset`` (connection dropped before forwarding), ``stall``
    (forwarded; part of the answer, then silence for ``stall_seconds``), ``truncate``
    (forwarded; the answer cut short and the connection closed), ``latency`` (forwarded
    after ``latency_seconds``, or when the proxy stops). ``counts`` maps (request type,
    kind or 'ok') to a count.
    """

    def __init__(
        self,
        rate: float,
        *,
        seed: int = 0,
        kinds: tuple[str, ...] = FAULT_KINDS,
        stall_seconds: float = 5.0,
        latency_seconds: float = 0.2,
    ) -> None:
        import random
        import threading
        from collections import Counter

        if not 0 <= rate <= 1 or not set(kinds) <= set(FAULT_KINDS) or not kinds:
            raise ValueError(f"rate in [0, 1] and kinds from {FAULT_KINDS}")
        self.rate, self.kinds = rate, kinds
        self.stall_seconds, self.latency_seconds = stall_seconds, latency_seconds
        self.counts: Counter[tuple[str, str]] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def draw(self, method: str, path: str) -> str | None:
        """The fault for this request, or None."""
        with self._lock:
            hit = self._rng.random() < self.rate
            kind = self._rng.choice(self.kinds) if hit else None
            self.counts[(request_type(method, path), kind or "ok")] += 1
        return kind


class ScheduledFaults(FaultPlan):
    """A fault at chosen requests and none at the others, for putting a fault at every step
    of an operation in turn, deterministically: ``schedule`` maps (request type as
    :func:`request_type` names it, n) to a kind, n counting that type's requests from 0."""

    def __init__(self, schedule: dict[tuple[str, int], str], *, stall_seconds: float = 5.0) -> None:
        kinds = tuple(sorted(set(schedule.values()))) or FAULT_KINDS
        super().__init__(0.0, kinds=kinds, stall_seconds=stall_seconds)
        self.schedule = dict(schedule)
        self._seen: dict[str, int] = {}

    def draw(self, method: str, path: str) -> str | None:
        """The scheduled fault for this request, or None."""
        kind_of = request_type(method, path)
        with self._lock:
            n = self._seen.get(kind_of, 0)
            self._seen[kind_of] = n + 1
            kind = self.schedule.get((kind_of, n))
            self.counts[(kind_of, kind or "ok")] += 1
        return kind
