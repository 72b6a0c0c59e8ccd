"""Local work that may outlast the call it belongs to: building a checkout's tree on its
destination disk, and removing the work folder of a failed build. On a slow or hung disk
either takes as long as the disk does, so the call waits only until its deadline (a
removal at least :data:`GRACE`) and leaves the rest to a thread of its own; the folder
keeps its work name (never served, locked against sweeps) until it is gone."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.errors import StorageTimeoutError

T = TypeVar("T")

log = logging.getLogger(__name__)

# What a failed call waits for its clean-up even when its deadline has passed: a local
# disk removes a half-built tree in less (so nothing is left when it returns), a slow or
# hung one costs the caller no more.
GRACE = 0.25

_running: dict[threading.Thread, str | None] = {}  # each with the place it works on
_changed = threading.Condition()


def clean_up(job: Callable[[], None], within: float, place: str | None = None) -> None:
    """Run ``job`` and wait for it at most ``within`` seconds (at least :data:`GRACE`);
    if it is not done by then it goes on in the background (:func:`wait_for_cleanups`;
    ``place``: what it works on, see :func:`finish_by`). An error it raises is logged,
    never raised: the caller is already failing with the error that matters."""
    _run_for(partial(_logged, job), max(within, GRACE), place)


def finish_by(fn: Callable[[], T], deadline: Deadline, what: str, place: str | None = None) -> T:
    """``fn()``, run on a thread of its own (with the caller's context variables) and
    waited for until ``deadline``: then StorageTimeoutError naming ``what``, and ``fn``
    goes on in the background (:func:`wait_for_cleanups`) until it notices the deadline
    itself or the disk it waits for answers. ``place`` (a destination's path): first wait,
    within the deadline, for what an earlier call left running there; a retry right after
    a timeout otherwise found the tree it was taking back and was refused as if the
    destination were in use."""
    if place is not None:
        with _changed:
            if not _changed.wait_for(lambda: place not in _running.values(), deadline.remaining()):
                raise StorageTimeoutError(
                    f"deadline exceeded during {what}: an earlier call's work at {place} is "
                    "still running, on a disk that does not answer"
                )
    box: list[Any] = []
    context = contextvars.copy_context()

    def run() -> None:
        try:
            box.append((True, context.run(fn)))
        except BaseException as e:  # handed to the caller, who raises it
            box.append((False, e))

    _run_for(run, deadline.remaining(), place)
    if not box:
        raise StorageTimeoutError(f"deadline exceeded during {what}")
    ok, value = box.pop()
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _run_for(job: Callable[[], None], seconds: float, place: str | None) -> None:
    """Run ``job`` on a daemon thread that :func:`wait_for_cleanups` waits for, and wait
    for it at most ``seconds`` (all of it, here, if no thread can be started: a process
    at its limit)."""
    worker = threading.Thread(target=_run, args=(job,), name="chroma-snapshots-local", daemon=True)
    with _changed:
        _running[worker] = place
    try:
        worker.start()
    except RuntimeError:
        with _changed:
            del _running[worker]
        job()
        return
    worker.join(seconds)


class Handoff:
    """Who decides first whether a tree built past the caller's wait (:func:`finish_by`)
    is delivered: the build, once its tree is in place (:meth:`keep`), or the caller,
    once its deadline passed (:meth:`give_up`). Exactly one of them decides."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._given_up: bool | None = None
        self.final = Path()

    def keep(self, final: Path) -> bool:
        """The build's: True if the tree at ``final`` is delivered (the caller waits)."""
        with self._lock:
            if self._given_up is None:
                self._given_up, self.final = False, final
            return not self._given_up

    def give_up(self) -> bool:
        """The caller's: True if no tree will be delivered (one in place is taken back)."""
        with self._lock:
            if self._given_up is None:
                self._given_up = True
            return self._given_up


def wait_for_cleanups(timeout: float | None = None) -> bool:
    """Wait until no local work of a failed call is still running (at most ``timeout``
    seconds; None: as long as it takes); True if none is. A checkout that failed at its
    deadline may leave the building or removal of its hidden work folder running on a
    slow or hung disk; a process about to exit can wait for it here. If it exits first, the next
    checkout to the same place removes what is left once it is a minute old."""
    with _changed:
        return _changed.wait_for(lambda: not _running, timeout)


def _run(job: Callable[[], None]) -> None:
    try:
        job()
    finally:
        with _changed:
            del _running[threading.current_thread()]
            _changed.notify_all()


def _logged(job: Callable[[], None]) -> None:
    try:
        job()
    except Exception:  # the removal is best effort; what is left is swept later
        log.warning("removing a failed build's work folder failed", exc_info=True)
