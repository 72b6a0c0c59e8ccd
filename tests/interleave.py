"""Deterministic interleavings of store operations at the backend seam.

Each actor (a thread running one store operation) reaches the backend through a
:class:`Gate`; a :class:`Schedule` lets exactly one backend call run at a time, in the
order its plan gives: ``["A"] * i + ["B"] * j`` runs A's first i calls, then B's first j,
then A to the end, then B. Enumerating every (i, j) runs B at every step boundary of A.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from chroma_snapshots.backends.base import (
    Backend,
    GetResult,
    ObjectMeta,
    PutMode,
    check_key,
    past_end,
)
from chroma_snapshots.backends.wrapped import WrappedBackend
from chroma_snapshots.errors import ConflictError, SnapshotNotFoundError

T = TypeVar("T")

WAIT = 30.0  # a schedule that cannot progress for this long is a bug in the test


class MemoryBackend(Backend):
    """Objects in a dict shared by every user of this object: fast enough to run thousands
    of schedules, with compare-and-swap like S3's (every write a new ETag) and modification
    times a test can move (:meth:`age`)."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, ObjectMeta]] = {}
        self._lock = threading.Lock()

    def copy(self) -> MemoryBackend:
        """An independent store with the same objects."""
        out = MemoryBackend()
        with self._lock:
            out._objects = dict(self._objects)
        return out

    def age(self, seconds: float) -> None:
        """Make every object ``seconds`` older."""
        with self._lock:
            for key, (data, m) in self._objects.items():
                old = ObjectMeta(m.key, m.size, m.etag, m.last_modified - seconds)
                self._objects[key] = (data, old)

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        with self._lock:
            found = self._objects.get(check_key(key))
        if found is None:
            raise SnapshotNotFoundError(f"{key}: no such object")
        data, meta = found
        if byte_range is not None:
            if byte_range[0] >= len(data):  # S3 answers 416
                raise past_end(key, byte_range[0])
            data = data[byte_range[0] : byte_range[1]]
        return GetResult(data, meta)

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        with self._lock:
            now = self._objects.get(check_key(key))
            if mode.kind == "create" and now is not None:
                raise ConflictError(f"{key} already exists")
            if mode.kind == "update" and (now is None or now[1].etag != mode.etag):
                raise ConflictError(f"{key} is not at etag {mode.etag}")
            meta = ObjectMeta(key, len(data), uuid.uuid4().hex, time.time())  # never reused
            self._objects[key] = (bytes(data), meta)
            return meta

    def head(self, key: str) -> ObjectMeta:
        return self.get(key, byte_range=None).meta

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        with self._lock:
            found = [m for k, (_, m) in self._objects.items() if k.startswith(prefix)]
        return iter(found)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)


class Killed(BaseException):
    """Raised into an actor at a planned step: the process died there."""


class Schedule:
    """Grants backend calls to actors one at a time, following ``plan`` then ``order``."""

    def __init__(self, plan: list[str], order: list[str], kill: dict[str, int] | None = None):
        self.plan, self.order, self.kill = plan, order, kill or {}
        self.pos = 0
        self.busy = False
        self.done: set[str] = set()
        self.dead: set[str] = set()
        self.calls: dict[str, int] = dict.fromkeys(order, 0)
        self.cond = threading.Condition()

    def _mine(self, actor: str) -> bool:
        if self.busy:
            return False
        while self.pos < len(self.plan) and self.plan[self.pos] in self.done:
            self.pos += 1
        if self.pos < len(self.plan):
            return self.plan[self.pos] == actor
        return actor == next(a for a in self.order if a not in self.done)

    def enter(self, actor: str) -> None:
        if actor in self.dead:
            raise Killed(actor)  # a dead process makes no more calls (no clean-up either)
        with self.cond:
            if not self.cond.wait_for(lambda: self._mine(actor), timeout=WAIT):
                raise RuntimeError(f"schedule stuck: {actor} at {self.pos} of {self.plan}")
            self.pos += 1
            self.calls[actor] += 1
            if self.kill.get(actor) == self.calls[actor]:
                self.dead.add(actor)
                raise Killed(actor)
            self.busy = True

    def leave(self) -> None:
        with self.cond:
            self.busy = False
            self.cond.notify_all()

    def finished(self, actor: str) -> None:
        with self.cond:
            self.done.add(actor)
            self.cond.notify_all()


class Gate(WrappedBackend):
    """``inner`` as seen by one actor: every call waits for its turn in ``schedule``."""

    def __init__(self, inner: Backend, schedule: Schedule | None, actor: str) -> None:
        super().__init__(inner)
        self.schedule, self.actor = schedule, actor
        self.calls = 0

    def around(self, op: str, keys: tuple[str, ...], call: Callable[[], T]) -> T:
        self.calls += 1
        if self.schedule is None:
            return call()
        self.schedule.enter(self.actor)
        try:
            return call()
        finally:
            self.schedule.leave()


@dataclass
class Outcome:
    """How an actor's operation ended: its return value or the exception it raised."""

    value: object = None
    error: BaseException | None = None


def run_actors(schedule: Schedule, actors: dict[str, Callable[[], object]]) -> dict[str, Outcome]:
    """Run each actor in its own thread under ``schedule``; every outcome is collected."""
    out = {a: Outcome() for a in actors}

    def body(actor: str) -> None:
        try:
            out[actor].value = actors[actor]()
        except BaseException as e:  # every outcome is checked by the caller
            out[actor].error = e
        finally:
            schedule.finished(actor)

    threads = [threading.Thread(target=body, args=(a,), daemon=True) for a in actors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
        assert not t.is_alive(), "an actor never finished"
    return out


def plans(
    n_first: int, n_second: int, first: str, second: str, *, pairs: bool
) -> Iterator[list[str]]:
    """Plans that run ``second`` at every step boundary of ``first``: all of it there, or
    (``pairs``) each of its first j calls there, then ``first`` to the end, then the rest."""
    for i in range(n_first + 1):
        for j in range(1, n_second + 1) if pairs else [n_second + 1_000_000]:
            yield [first] * i + [second] * j


def sandwiches(n_outer: int, n_inner: int, outer: str, inner: str) -> Iterator[list[str]]:
    """Plans with two switches into ``inner``: ``outer`` runs a calls, ``inner`` its first b,
    ``outer`` c more, then ``inner`` to the end, then ``outer`` to the end. A race that needs
    the inner operation split around two steps of the outer one (start before a look, finish
    inside the next) shows only in these."""
    for a in range(n_outer + 1):
        for b in range(1, n_inner):
            for c in range(1, n_outer - a + 1):
                yield [outer] * a + [inner] * b + [outer] * c
