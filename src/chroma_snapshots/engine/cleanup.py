"""Work that may outlast the call it belongs to: building a checkout's tree on its
destination disk, removing the work folder of a failed build, and removing a finished pin
or prune record from the store (backends/bounded.tidy). On a slow or hung disk
either takes as long as the disk does, so the call waits only until its deadline (a
removal at least :data:`GRACE`) and leaves the rest to its thread
(:func:`~chroma_snapshots.engine.deadline.run_within`); the folder keeps its work name
(never served, locked against sweeps) until it is gone. What this module adds is the
record of that work: which of it is still running, and on which destination."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

from chroma_snapshots.engine.deadline import Deadline, WorkerPool, run_within
from chroma_snapshots.engine.deadline import within as as_current
from chroma_snapshots.errors import ProcessLimitError, StorageTimeoutError

T = TypeVar("T")

log = logging.getLogger(__name__)

# What a failed call waits for its clean-up even when its deadline has passed: a local
# disk removes a half-built tree in less (so nothing is left when it returns), a slow or
# hung one costs the caller no more.
GRACE = 0.25

_running: dict[_Job, str | None] = {}  # each with the place it works on
_changed = threading.Condition()


def clean_up(job: Callable[[], None], within: float, place: str | None = None) -> None:
    """Run ``job`` on a thread of its own and wait for it at most ``within`` seconds (at
    least :data:`GRACE`); if it is not done by then it goes on in the background
    (:func:`wait_for_cleanups`; ``place``: what it works on, see :func:`finish_by`). It
    runs however late its thread gets going: waited for as a call is (run_within), a
    removal whose thread had not started by the end of the wait was cancelled, and on a
    loaded machine its work folder stayed until a sweep a minute later. An error it
    raises is logged, never raised: the caller is already failing with the error that
    matters; what is not an error (a BaseException: an exit) is raised here if it came
    within the wait."""
    done = threading.Event()
    limit = max(within, GRACE)
    entry = _Job(place)  # on record before its thread starts: no wait can miss it
    ended: list[BaseException] = []

    def logged() -> None:
        try:
            entry.run(partial(_logged, job))
        except BaseException as e:  # an exit, not an error: handed to the caller below
            ended.append(e)
        finally:
            done.set()

    try:
        pool = WorkerPool(1, name="chroma-snapshots:clean-up")
    except StorageTimeoutError:  # refused: too many calls left running (a hung disk)
        entry.call_off()
        return  # what it would have removed is swept later
    try:
        pool.submit(as_current, Deadline(limit), logged)
    except ProcessLimitError:  # no thread could start (a process at its limit): here, then
        logged()
    except BaseException:  # interrupted before it was handed over: off the record
        entry.call_off()
        pool.shutdown(wait=False)
        raise
    try:
        _wait_through_interrupts(done, limit)  # a further interrupt is raised after the wait
    finally:  # never cancelled; counted as abandoned only if still running now
        pool.shutdown(wait=False)
    if ended:
        raise ended.pop()


def finish_by(fn: Callable[[], T], deadline: Deadline, what: str, place: str | None = None) -> T:
    """``fn()``, run on a thread of its own and waited for until ``deadline``: then
    StorageTimeoutError naming ``what``, and ``fn`` goes on in the background
    (:func:`wait_for_cleanups`) until it notices the deadline itself or the disk it waits
    for answers. ``place`` (a destination's path): first wait, within the deadline, for
    what an earlier call left running there; a retry right after a timeout otherwise
    found the tree it was taking back and was refused as if the destination were in use."""
    if place is not None:
        with _changed:
            if not _changed.wait_for(lambda: place not in _running.values(), deadline.remaining()):
                raise StorageTimeoutError(
                    f"deadline exceeded during {what}: an earlier call's work at {place} is "
                    "still running, on a disk that does not answer"
                )
    return _recorded(fn, deadline, what, place)


def on_record(fn: Callable[[], T]) -> T:
    """``fn()`` in the calling thread, on record while it runs: for work that a failing
    call may abandon on a thread of its pool (an S3 multipart upload of one pack while
    another pack's upload failed), so that :func:`wait_for_cleanups`, and the CLI at exit,
    wait until it has finished or cleaned up after itself."""
    return _Job(None).run(fn)


def _recorded(fn: Callable[[], T], deadline: Deadline, what: str, place: str | None) -> T:
    """:func:`run_within`, with the work on record from before its thread starts until it
    returns (or is called off unstarted), so that no wait can miss it."""
    job = _Job(place)
    try:
        return run_within(deadline, what, partial(job.run, fn))
    finally:
        job.call_off()


class _Job:
    """One piece of work on record in ``_running`` while it may still run."""

    def __init__(self, place: str | None) -> None:
        self._state = "waiting"
        with _changed:
            _running[self] = place

    def run(self, fn: Callable[[], T]) -> T:
        with _changed:
            if self._state != "waiting":  # called off before its thread got to it
                raise StorageTimeoutError("called off before it started")
            self._state = "running"
        try:
            return fn()
        finally:
            self._end()

    def call_off(self) -> None:
        """Off the record if it has not started (it never will); else it ends itself."""
        with _changed:
            if self._state == "waiting":
                self._end()

    def _end(self) -> None:
        with _changed:
            self._state = "ended"
            _running.pop(self, None)
            _changed.notify_all()


class Handoff:
    """Who decides first whether a tree built past the caller's wait (:func:`finish_by`)
    is delivered: the build, once its tree is in place (:meth:`keep`), or the caller,
    once its deadline passed (:meth:`give_up`). Exactly one of them decides."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._given_up: bool | None = None
        self._take_back: Callable[[], None] | None = None
        self.final = Path()
        self.started = False  # the build began (a call refused before it never does)
        self.ended = threading.Event()  # set when the build returns or fails (after removal)

    def keep(self, final: Path, take_back: Callable[[], None]) -> bool:
        """The build's: True if the tree at ``final`` is delivered (the caller waits);
        ``take_back()`` removes it if the caller fails before it has it."""
        with self._lock:
            if self._given_up is None:
                self._given_up, self.final, self._take_back = False, final, take_back
            return not self._given_up

    def take_back(self) -> None:
        """The caller's, failing (a Ctrl-C) after the tree was delivered: remove it, once."""
        with self._lock:
            undo, self._take_back = self._take_back, None
        if undo is not None:
            with interrupts_held():  # a second Ctrl-C must not cut the removal short
                undo()

    def give_up(self) -> bool:
        """The caller's: True if no tree will be delivered (one in place is taken back).
        Then waits at most :data:`GRACE` for the build to end: past its deadline it stops
        at its next check and removes its work folder, so on a disk that answers the
        caller returns with nothing left (a process exiting at once would otherwise end
        the removal half done, its threads being daemons)."""
        with self._lock:
            if self._given_up is None:
                self._given_up = True
            given_up = self._given_up
        if given_up and self.started:
            _wait_through_interrupts(self.ended, GRACE)
        return given_up


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) is held, and raised as KeyboardInterrupt once the
    block is done: a failed call's clean-up starts whole even when a second interrupt
    follows the first by milliseconds (it skipped a cache build's removal, or its claim on
    the room, and a process exiting at once left them). Only in the main thread where
    Python's own handler is installed: a host program's handler is left alone."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _wait_through_interrupts(event: threading.Event, seconds: float) -> None:
    """``event.wait(seconds)``, waited out even if interrupted meanwhile (a second Ctrl-C
    must not cut the clean-up of the first short); the interrupt is raised after."""
    end = time.monotonic() + seconds
    interrupted: BaseException | None = None
    while not event.is_set() and (left := end - time.monotonic()) > 0:
        try:
            event.wait(left)
        except BaseException as e:  # KeyboardInterrupt: raised once the wait is over
            interrupted = e
    if interrupted is not None:
        raise interrupted


def wait_for_cleanups(timeout: float | None = None) -> bool:
    """Wait until no work of a failed call is still running (at most ``timeout`` seconds;
    None: as long as it takes); True if none is. A checkout that failed at its deadline may
    leave the building or removal of its hidden work folder running on a slow or hung disk,
    and a call that timed out the removal of its pin or prune record; a process about to
    exit can wait for them here (the CLI waits up to a second). If it exits first, the next
    checkout to the same place removes what is left once it is a minute old. A timeout that
    is not a finite number of seconds (at most 1e9) is an InvalidInputError, as a deadline's."""
    return _wait_done(frozenset(), None if timeout is None else Deadline(timeout))


def running() -> frozenset[object]:
    """The clean-ups running now, for :func:`wait_for_new`."""
    with _changed:
        return frozenset(_running)


def wait_for_new(before: frozenset[object], timeout: float) -> bool:
    """:func:`wait_for_cleanups` for the clean-ups started since ``before`` (:func:`running`)
    only: a command waits for its own, not for a hung disk's that an earlier one left."""
    return _wait_done(before, Deadline(timeout))


def _wait_done(before: frozenset[object], until: Deadline | None) -> bool:
    """Wait until every clean-up running is one of ``before`` (until ``until``; None:
    forever). A timeout that is not a finite number of seconds is refused by Deadline
    first: NaN waited forever, inf overflowed."""
    with _changed:
        left = None if until is None else until.remaining()
        return _changed.wait_for(lambda: _running.keys() <= before, left)


def _logged(job: Callable[[], None]) -> None:
    try:
        job()
    except Exception:  # the removal is best effort; what is left is swept later
        log.warning("a clean-up failed (what it would have removed is swept later)", exc_info=True)
