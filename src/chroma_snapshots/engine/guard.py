"""The hang guard: filesystem calls on a network mount that can never hang the caller.

A call into a hung NFS/EFS (or FUSE) mount blocks in the kernel and cannot be
interrupted: not by ``signal.alarm``, not by abandoning a thread (which then
keeps the process from exiting), not by ``ThreadPoolExecutor`` or
``multiprocessing`` (both wait for stuck workers at exit). What works is a child
process that is killed when its budget runs out and never waited on in the
caller's path. So every call runs in a small pool of worker processes:

- a call that overruns ``op_timeout`` (or the caller's deadline) kills its worker
  and raises StorageTimeoutError naming the operation;
- if the call had the whole ``op_timeout`` (not cut short by a caller's deadline: a
  slow call is no sign of a sick mount), the circuit breaker then opens: calls fail
  fast for ``cooldown`` seconds instead of feeding more workers to the mount; after
  the cool-down one probe (stat + listdir of the root, in a fresh worker) decides
  whether to close it;
- at most ``max_abandoned`` killed workers may still be stuck in the kernel; past
  that the guard refuses to start more. A daemon thread reaps them once the mount
  lets go, so they never become a leak, and ``stats()`` reports them;
- a worker that died (killed by an operator or the OOM killer, idle or busy) is
  never used again. Each worker acknowledges a request once it has read all of
  it and before running it, so a death without that acknowledgement proves the
  call never ran: it is retried once on a fresh worker. A death after it leaves
  the outcome unknown (a write may or may not have landed), so it raises
  BackendUnavailableError, as does a worker that cannot be started.

The clock is injectable so breaker tests need not sleep.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.mountworker import DiedBeforeTheCall, Worker, WorkerDied, request
from chroma_snapshots.engine.retry import RetryPolicy
from chroma_snapshots.errors import BackendUnavailableError, SnapshotError, StorageTimeoutError

_STARTUP = 30.0  # seconds a new worker may take to start when the caller gave no deadline
_HANDOFF = 0.25  # seconds before the caller's deadline at which a call's budget ends


@dataclass(frozen=True)
class GuardStats:
    """Health of a guarded mount."""

    healthy: bool
    open_until: float | None
    timeouts: int
    abandoned: int
    calls: int
    died: int = 0  # workers found dead (killed idle or during a call) and replaced


@dataclass(frozen=True)
class _Call:
    """One request: its pickled form, the module its target comes from, and whose it is."""

    payload: bytes
    module: str
    deadline: Deadline | None
    label: str
    timeout: float | None = None  # at most this long for the call itself (op_timeout's cap)


_FRESH_WORKER = RetryPolicy(attempts=2, base=0.0, jitter=False)
"""A call no worker ran is tried once more on a fresh worker: safe even for a write."""


_SHARED: dict[tuple[str, float], MountGuard] = {}
_SHARED_LOCK = threading.Lock()


class MountGuard:
    """Runs ``target.method(*args)`` in abandonable worker processes, with a breaker."""

    def __init__(
        self,
        label: str,
        *,
        op_timeout: float = 10.0,
        cooldown: float = 30.0,
        max_abandoned: int = 4,
        workers: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.op_timeout = op_timeout
        self.cooldown = cooldown
        self.max_abandoned = max_abandoned
        self._clock = clock
        self._idle: list[Worker] = []
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._open_until: float | None = None
        self._abandoned: list[subprocess.Popen[bytes]] = []
        self._timeouts = 0
        self._calls = 0
        self._died = 0
        self._busy = 0  # calls running in a worker now

    @classmethod
    def shared(cls, path: str, *, op_timeout: float = 10.0) -> MountGuard:
        """The one guard of this process for the mount at ``path`` with that budget, made
        on first use: its cap on stuck workers and its breaker are the mount's, not a
        store object's (a store opened per request stranded 4 more workers each on a hung
        mount). Its ``close()`` stops only idle workers, so one store closing it does not
        break another."""
        key = (os.path.abspath(path), op_timeout)  # no call into the mount: it may hang
        with _SHARED_LOCK:
            guard = _SHARED.get(key)
            if guard is None:
                guard = _SHARED[key] = cls(path, op_timeout=op_timeout)
            return guard

    def stats(self) -> GuardStats:
        """Breaker state and how many workers were abandoned (and are not yet reaped)."""
        with self._lock:
            self._abandoned = [p for p in self._abandoned if p.poll() is None]
            return GuardStats(
                self._open_until is None,
                self._open_until,
                self._timeouts,
                len(self._abandoned),
                self._calls,
                self._died,
            )

    def run(
        self,
        target: Any,
        method: str,
        *args: Any,
        deadline: Deadline | None = None,
        what: str = "",
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``target.method(*args, **kwargs)`` in a worker within the budget: the
        caller's deadline and ``op_timeout``, or ``timeout`` if shorter (then, as with a
        deadline, not answering in time does not mark the mount unhealthy)."""
        label = f"{what or method} on {self.label}"
        self._admit(label, target, deadline, timeout)
        return self._call(target, method, args, kwargs, deadline, label, timeout)

    def _admit(
        self, label: str, target: Any, deadline: Deadline | None, timeout: float | None
    ) -> None:
        with self._lock:
            until = self._open_until
        if until is not None:
            if self._clock() < until:
                raise StorageTimeoutError(
                    f"{label}: the mount is marked unhealthy after a timeout; failing fast for "
                    f"another {until - self._clock():.1f}s"
                )
            # half-open: the probe within the call's budget too (the call after a timeout is
            # held to its deadline like any other)
            self._call(target, "probe", (), {}, deadline, f"probe of {self.label}", timeout)
            with self._lock:
                self._open_until = None

    def _call(
        self,
        target: Any,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: Deadline | None,
        label: str,
        timeout: float | None = None,
    ) -> Any:
        budget = self.op_timeout if deadline is None else min(self.op_timeout, deadline.remaining())
        payload = request(target, method, args, kwargs)
        if not self._slots.acquire(timeout=budget):
            raise StorageTimeoutError(f"{label}: no filesystem worker free within {budget:.1f}s")
        call = _Call(payload, type(target).__module__, deadline, label, timeout)
        try:
            return _FRESH_WORKER.call(lambda _: self._attempt(call), retry_on=(DiedBeforeTheCall,))
        except WorkerDied as e:
            raise BackendUnavailableError(
                f"{label}: the filesystem worker died "
                + ("during the call; its outcome is unknown" if e.ran else "twice before the call")
            ) from e
        finally:
            self._slots.release()

    def _attempt(self, call: _Call) -> Any:
        worker, new = self._take(call.label, call.module)  # counted as busy from here
        try:
            if new:
                self._start(worker, call)
            return self._run_on(worker, call)
        finally:
            with self._lock:
                self._busy -= 1

    def _run_on(self, worker: Worker, call: _Call) -> Any:
        # The budget is the filesystem call's, measured once a worker is ready: starting a
        # Python is not the mount's fault (and on a loaded machine takes a second).
        budget = self.op_timeout if call.timeout is None else min(self.op_timeout, call.timeout)
        if call.deadline is not None:
            # End a little before the caller's deadline, so the timeout is ours, not a
            # caller's wait that gave up a moment earlier (and the worker is not left).
            left = call.deadline.remaining()
            budget = min(budget, left - min(_HANDOFF, left / 10))
        try:
            result = worker.call(call.payload, budget)
        except TimeoutError:
            # Only a call that had the whole op_timeout says the mount is unhealthy: one
            # cut short by its caller's deadline may just have been slow (a big read), and
            # opening the breaker then failed the next calls of a healthy mount for the
            # cool-down. Its worker is killed and counted among the stuck all the same.
            # A call with a budget of its own (timeout=: a store opening) never opens it
            # either, whatever op_timeout is: it is not the guard's judgement of the mount.
            sick = budget >= self.op_timeout and call.timeout is None
            self._abandon(worker, sick)
            own = call.timeout is not None and budget >= min(call.timeout, self.op_timeout)
            why = "" if sick else " (the call's own budget)" if own else " (the caller's deadline)"
            raise StorageTimeoutError(
                f"{call.label} did not return within {budget:.1f}s{why}"
            ) from None
        except SnapshotError:
            self._give_back(worker)
            raise
        except WorkerDied:
            self._bury(worker)
            raise
        except BaseException:
            worker.kill()
            raise
        self._give_back(worker)
        return result

    def _start(self, worker: Worker, call: _Call) -> None:
        """Wait for a new worker within the caller's deadline (it never touched the mount)."""
        budget = _STARTUP if call.deadline is None else call.deadline.remaining()
        try:
            worker.wait_ready(budget)
        except TimeoutError:
            worker.kill()
            self._reap(worker.proc)
            raise StorageTimeoutError(
                f"{call.label}: a filesystem worker did not start within {budget:.1f}s"
            ) from None

    def _take(self, label: str, module: str) -> tuple[Worker, bool]:
        """An idle worker that is still alive, or a new one (True); dead ones are buried."""
        with self._lock:
            # Every call in progress may yet be abandoned: counting them with the workers
            # already stuck is what bounds the stuck ones, also under concurrent callers and
            # for the breaker's probe.
            self._abandoned = [p for p in self._abandoned if p.poll() is None]
            if len(self._abandoned) + self._busy >= self.max_abandoned:
                raise StorageTimeoutError(
                    f"{label}: {len(self._abandoned)} workers are still stuck in the mount "
                    f"and {self._busy} calls are running; refusing to start more"
                )
            self._busy += 1
            self._calls += 1
            alive: list[Worker] = []
            dead: list[Worker] = []
            for w in self._idle:
                (alive if w.alive() else dead).append(w)
            self._idle = alive
            worker = alive.pop() if alive else None
        for w in dead:
            self._bury(w)
        if worker is not None:
            return worker, False
        try:
            return Worker(module), True
        except OSError as e:
            with self._lock:
                self._busy -= 1
            raise BackendUnavailableError(f"{label}: cannot start a filesystem worker: {e}") from e

    def _give_back(self, worker: Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def _bury(self, worker: Worker) -> None:
        """Forget a worker that died (its pipes broke or poll() says so)."""
        worker.kill()
        with self._lock:
            self._died += 1
        self._reap(worker.proc)

    def _abandon(self, worker: Worker, sick: bool) -> None:
        """Kill a worker whose call timed out (counted as stuck until it exits); ``sick``:
        the mount did not answer within op_timeout, so the breaker opens and the idle
        workers, which may have touched it too, go."""
        worker.kill()
        with self._lock:
            self._timeouts += 1
            self._abandoned.append(worker.proc)
            stale: list[Worker] = []
            if sick:
                self._open_until = self._clock() + self.cooldown
                stale, self._idle = self._idle, []
        for w in stale:  # start afresh later
            w.kill()
            self._reap(w.proc)
        self._reap(worker.proc)

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        # waitpid sleeps interruptibly, so this thread never blocks interpreter exit
        reaper = threading.Thread(target=proc.wait, daemon=True, name="guard-reaper")
        with contextlib.suppress(RuntimeError):  # at the thread limit: a zombie until exit
            reaper.start()

    def close(self) -> None:
        """Stop the idle workers."""
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.kill()
            self._reap(w.proc)
