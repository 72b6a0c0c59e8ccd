"""Deadlines: one monotonic budget shared by every wait inside an operation, and the
worker pools whose work a deadline may abandon."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar

from chroma_snapshots.errors import InvalidInputError, ProcessLimitError, StorageTimeoutError

T = TypeVar("T")
P = ParamSpec("P")
MAX_SECONDS = 1e9  # ~31 years: a deadline much past it overflows time_t in waits


class LambdaContext(Protocol):
    """The one method of AWS Lambda's context object a deadline needs."""

    def get_remaining_time_in_millis(self) -> int: ...


LAMBDA_MAX_SECONDS = 900.0  # the longest a Lambda invocation runs


def lambda_remaining(ctx: LambdaContext | None) -> float:
    """Seconds the invocation has left, from 0 to Lambda's longest invocation (900 s); a
    context without a usable clock (a handler called by hand with ``None``) counts as the
    longest, never an AttributeError that would fail a whole batch."""
    try:  # a context is the caller's object: whatever its clock raises, it has none
        clock = getattr(ctx, "get_remaining_time_in_millis", None)
        ms = float(clock()) if callable(clock) else math.nan
    except Exception:
        ms = math.nan
    return LAMBDA_MAX_SECONDS if math.isnan(ms) else min(max(0.0, ms / 1000), LAMBDA_MAX_SECONDS)


class Deadline:
    """A point in (monotonic) time by which an operation must have finished.

    ``clock`` is injectable so tests can move time without sleeping.
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise InvalidInputError(f"a deadline is a number of seconds, not {seconds!r}")
        try:
            finite = math.isfinite(seconds)
        except OverflowError:  # an int past any float: 10**400
            finite = False
        if not finite:  # inf overflows every wait; nan compares false
            raise InvalidInputError(f"a deadline must be a finite number of seconds: {seconds}")
        if seconds > MAX_SECONDS:
            raise InvalidInputError(
                f"a deadline must be at most {MAX_SECONDS:.0e} seconds: {seconds}"
            )
        self._clock = clock
        self._end = clock() + seconds
        self._called_off = False

    @classmethod
    def from_lambda_context(cls, ctx: LambdaContext | None, *, reserve: float = 5.0) -> Deadline:
        """The invocation's remaining time (:func:`lambda_remaining`) minus ``reserve``
        seconds for clean-up."""
        return cls(max(0.0, lambda_remaining(ctx) - reserve))

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._end - self._clock())

    def expired(self) -> bool:
        """True once no time is left."""
        return self.remaining() <= 0.0

    def check(self, what: str) -> None:
        """Raise StorageTimeoutError naming ``what`` if the deadline has passed."""
        if self.expired():
            why = "the call was interrupted" if self.called_off else "deadline exceeded"
            raise StorageTimeoutError(f"{why} during {what}")

    @property
    def called_off(self) -> bool:
        """True once :meth:`call_off` ended this deadline."""
        return self._called_off

    def call_off(self) -> None:
        """End the budget now, for every thread that checks it: the work of a call whose
        caller was interrupted (Ctrl-C) stops at its next check, as at a deadline, and
        removes what it wrote, instead of running on to the deadline."""
        self._called_off = True
        self._end = -math.inf

    def child(self, seconds: float) -> Deadline:
        """A budget of at most ``seconds`` that also ends no later than this one."""
        return Deadline(min(seconds, self.remaining()), clock=self._clock)


DeadlineLike = Deadline | float | int | None


def call_off_if_interrupt(deadline: Deadline, error: BaseException) -> None:
    """Call ``deadline`` off (:meth:`Deadline.call_off`) if ``error`` interrupts the call
    (KeyboardInterrupt, SystemExit: not an Exception), wherever the waiting thread was:
    the call's work stops at its next check. An error of the work leaves it as it is."""
    if not isinstance(error, Exception):
        deadline.call_off()


def as_deadline(value: DeadlineLike, default: float) -> Deadline:
    """A ``deadline=`` argument (Deadline, seconds, or None: ``default``) as a Deadline.
    Within :func:`one_deadline`, None is the deadline the first such call started."""
    if isinstance(value, Deadline):
        return value
    if value is not None:
        return Deadline(value)
    shared = _SHARED.get()
    if shared is None:
        return Deadline(default)
    if not shared:
        shared.append(Deadline(default))
    return shared[0]


_SHARED: ContextVar[list[Deadline] | None] = ContextVar("chroma_snapshots_shared", default=None)


@contextmanager
def one_deadline() -> Iterator[None]:
    """Within, every call given no deadline of its own shares one: the first such call's
    default, started when it starts. A CLI command is one unit of work for its user
    (``sync`` copies many versions, ``checkout`` resolves then reads): ``--timeout``
    bounds all of it, not each call."""
    token = _SHARED.set([])
    try:
        yield
    finally:
        _SHARED.reset(token)


_CURRENT: ContextVar[Deadline | None] = ContextVar("chroma_snapshots_deadline", default=None)


def current_deadline() -> Deadline | None:
    """The deadline of the store operation this thread is working for, if any.

    Lets layers below the Backend interface (the hang guard) size their own
    budgets without every backend method taking a ``deadline`` argument.
    """
    return _CURRENT.get()


def checked(items: Iterable[T], check: Callable[[], None]) -> Iterator[T]:
    """``items``, with ``check()`` (a deadline's; it may raise) run before each: local
    work over thousands of files stops at the deadline. Before each, not every few: one
    item costs a few system calls, microseconds on a local disk but tens of
    milliseconds on a slow mount (64 files between checks overran a 2 s deadline by 20 s);
    a check costs ~0.2 us."""
    for item in items:
        check()
        yield item


def within(deadline: Deadline, fn: Callable[[], T]) -> T:
    """Call ``fn`` with ``deadline`` as the current deadline (for pool threads)."""
    token = _CURRENT.set(deadline)
    try:
        return fn()
    finally:
        _CURRENT.reset(token)


def run_within(deadline: Deadline, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a daemon thread and wait at most until ``deadline``: :func:`wait_all`
    of one call, so one mechanism bounds every wait.

    On time-out the thread is abandoned (a daemon thread waiting on a socket or on
    the hang guard's pipe never blocks interpreter exit) and StorageTimeoutError
    names ``what``. A call whose deadline has already passed (or was called off) is not
    started: a write or delete started then would land while its caller is told it failed.
    """
    if deadline.expired():
        raise StorageTimeoutError(f"{what} {_unfinished(deadline)}")
    with WorkerPool(1, name=f"deadline:{what[:40]}") as pool:
        return wait_all([pool.submit(within, deadline, fn)], deadline, what)[0]


def _unfinished(deadline: Deadline) -> str:
    return "was interrupted" if deadline.called_off else "did not finish within the deadline"


def wait_all(futures: Sequence[Future[T]], deadline: Deadline, what: str) -> list[T]:
    """The futures' results in order, waiting no longer than ``deadline``.

    The first failure is raised as soon as it happens (not after slower calls submitted
    before it), the deadline as StorageTimeoutError naming ``what``. Either way the calls
    not yet started are cancelled; calls already running are abandoned (counted by their
    :class:`WorkerPool` when it is left), so whatever they could still touch must be fenced
    by the caller (``transfer.Placer`` refuses writes once closed). Interrupted while
    waiting, it calls ``deadline`` off (:meth:`Deadline.call_off`) and re-raises."""
    try:
        done, pending = _wait(futures, deadline)
    except BaseException as e:  # interrupted (KeyboardInterrupt)
        call_off_if_interrupt(deadline, e)
        _cancel(futures)
        raise
    error = _first_error(futures, done)
    if error is not None or pending:
        _cancel(futures)
    if error is not None:
        try:
            raise error
        finally:
            # The error's traceback holds this frame: without these references, a cycle
            # (frame -> futures -> error -> traceback -> frame) kept the caller's data
            # (a publish's whole file list) alive until a full garbage collection.
            del error, futures, done, pending
    if pending:
        raise StorageTimeoutError(f"{what} {_unfinished(deadline)}")
    return [f.result() for f in futures]


_CALL_OFF_POLL = 0.05  # how soon a wait notices its deadline called off by another thread


def _wait(
    futures: Sequence[Future[T]], deadline: Deadline
) -> tuple[set[Future[T]], set[Future[T]]]:
    """``wait`` for the first failure or all of ``futures``, until ``deadline``, in slices:
    a deadline another thread calls off (an interrupted caller's) ends it within
    ``_CALL_OFF_POLL``, so the work waiting here cleans up at once instead of when its
    slowest read returns."""
    pending: set[Future[T]] = set(futures)
    while True:
        slice_ = min(deadline.remaining(), _CALL_OFF_POLL)
        newly, pending = wait(pending, timeout=slice_, return_when=FIRST_EXCEPTION)
        failed = any(not f.cancelled() and f.exception() is not None for f in newly)
        if not pending or failed or deadline.expired():
            return set(futures) - pending, pending


def _first_error(futures: Sequence[Future[Any]], done: set[Future[Any]]) -> BaseException | None:
    """The error of the first of ``futures`` (in their order) that failed, if any."""
    for f in futures:
        if f in done and (e := f.exception()) is not None:
            return e
    return None


def _cancel(futures: Sequence[Future[Any]]) -> None:
    for f in futures:
        f.cancel()


# Calls still running in a pool that was left (a deadline passed, a sibling call failed, an
# exception left the ``with`` block), in this process. Each holds a thread until it returns:
# on a mount that hangs without the guard in front of it, that is never. Past the cap a new
# pool is refused at once, so a wedged store costs a bounded number of threads.
MAX_ABANDONED = 256
_abandoned = 0
_abandoned_lock = threading.Lock()


def abandoned_calls() -> int:
    """How many calls left running by a worker pool that was left are still running in
    this process (whatever made the pool's owner leave: a deadline, a failure)."""
    return _abandoned


def _count_abandoned(n: int) -> None:
    global _abandoned
    with _abandoned_lock:
        _abandoned += n


def start_thread(thread: threading.Thread, what: str) -> None:
    """``thread.start()``; at the process's limit on threads, ProcessLimitError naming
    ``what`` (Python's RuntimeError would surface as a traceback)."""
    try:
        thread.start()
    except RuntimeError as e:
        raise ProcessLimitError(
            f"{what}: cannot start a thread ({e}): the process is at its limit of threads or "
            "processes (RLIMIT_NPROC, a container's pids limit)"
        ) from e


_Task = tuple[Future[Any], Callable[[], Any]] | None  # None: a worker's signal to exit


class WorkerPool(Executor):
    """Up to ``workers`` daemon threads running submitted calls, for one operation.

    Each checkout and publish makes its own pool and abandons it when it ends: a read
    stuck on a stalled S3 body holds its thread until the socket times out (30 s by
    default), and on a pool shared by the store's operations a few such reads starved
    every later checkout and publish of the same store object (a warm Lambda kept
    failing). With a pool per operation, abandoned work only ever holds its own threads.
    Daemon threads, because ThreadPoolExecutor joins its threads at interpreter exit and
    an abandoned read would hold up the exit of a process whose call timed out.

    Leaving a ``with`` block (or ``shutdown(wait=False)``) cancels the calls not yet
    started and does not wait for running ones: they are abandoned, and counted in
    :func:`abandoned_calls` until they return, however the pool was left (a deadline, a
    sibling call that failed, any exception). While ``MAX_ABANDONED`` abandoned calls are
    still running, a new pool is a StorageTimeoutError.
    """

    def __init__(self, workers: int, name: str = "chroma-snapshots") -> None:
        if _abandoned >= MAX_ABANDONED:
            raise StorageTimeoutError(
                f"{name}: {_abandoned} earlier calls abandoned (by a deadline or a failure) are "
                "still running (a store that hangs?); not starting more until they return"
            )
        self._size = workers
        self._name = name
        self._tasks: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._left = False  # shut down without waiting: calls running now are abandoned
        self._busy: dict[threading.Thread, Future[Any]] = {}  # workers' current calls
        self._counted: set[threading.Thread] = set()  # ... whose call is in the count

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a pool that was shut down")
            self._tasks.put((fut, partial(fn, *args, **kwargs)))
            if len(self._threads) < self._size:  # threads start on demand, up to the size
                t = threading.Thread(target=self._work, daemon=True, name=self._name)
                self._threads.add(t)
                try:
                    start_thread(t, self._name)
                except ProcessLimitError:
                    self._threads.discard(t)
                    if not self._threads:  # no worker would ever run the call
                        raise
        return fut

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            fut, call = task
            if fut.set_running_or_notify_cancel():
                self._mark(fut)
                try:
                    fut.set_result(call())
                except BaseException as e:  # handed to whoever waits on the future
                    fut.set_exception(e)
                finally:
                    self._mark(None)
            del task, fut, call  # an idle thread keeps no arguments (buffers) alive
        with self._lock:
            self._threads.discard(threading.current_thread())

    def _mark(self, fut: Future[Any] | None) -> None:
        """Track this worker's call (``fut``, None once it returned). A call running in a
        pool that was left is in the count from then (or from its start, for one queued
        before and not cancelled) until it returns; only here and in shutdown, under the
        pool's lock, so each is counted once."""
        me = threading.current_thread()
        with self._lock:
            if fut is not None:
                self._busy[me] = fut
                if self._left:
                    self._counted.add(me)
                    _count_abandoned(1)
            else:
                del self._busy[me]
                if me in self._counted:
                    self._counted.discard(me)
                    _count_abandoned(-1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if not wait and not self._left:
                self._left = True
                # a call whose result is already handed over is not running any more
                fresh = {t for t, f in self._busy.items() if not f.done()} - self._counted
                self._counted |= fresh
                _count_abandoned(len(fresh))
            while cancel_futures:
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task[0].cancel()
            threads = list(self._threads)
            for _ in threads:
                self._tasks.put(None)
        if wait:
            for t in threads:
                t.join()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.shutdown(wait=False, cancel_futures=True)
