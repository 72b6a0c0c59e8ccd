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
import importlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.retry import RetryPolicy
from chroma_snapshots.errors import BackendUnavailableError, SnapshotError, StorageTimeoutError

_LEN = struct.Struct("!Q")
_ACK = b"\x01"  # sent by a worker once it holds the whole request, before running it
_READY = b"\x02"  # sent by a new worker once Python started and its target's module loaded
_STARTUP = 30.0  # seconds a new worker may take to start when the caller gave no deadline
_HANDOFF = 0.25  # seconds before the caller's deadline at which a call's budget ends
_WORKER = "from chroma_snapshots.engine.guard import worker_main; worker_main()"


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


class _WorkerDied(Exception):
    """The worker's pipes broke; ``ran`` says whether it may have run the call."""

    def __init__(self, ran: bool) -> None:
        super().__init__("the filesystem worker died" + (" during the call" if ran else ""))
        self.ran = ran

    @staticmethod
    def of(ran: bool) -> _WorkerDied:
        return _WorkerDied(True) if ran else _DiedBeforeTheCall(False)


class _DiedBeforeTheCall(_WorkerDied):
    """The worker died before it acknowledged the call: it never ran."""


_FRESH_WORKER = RetryPolicy(attempts=2, base=0.0, jitter=False)
"""A call no worker ran is tried once more on a fresh worker: safe even for a write."""


class _Worker:
    def __init__(self, preload: str) -> None:
        self.proc = subprocess.Popen(  # OSError (no fds, no memory) is the caller's to map
            [sys.executable, "-c", _WORKER, preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # a worker stuck in the kernel must not hold the caller's stderr open
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C for the caller is not also a signal for it
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, budget: float) -> None:
        """Wait for a new worker's start-up; TimeoutError past ``budget``."""
        if self._read(len(_READY), time.monotonic() + budget, ran=False) != _READY:
            raise _DiedBeforeTheCall(ran=False)

    def call(self, payload: bytes, budget: float) -> Any:
        """Run one request; TimeoutError past ``budget``, _WorkerDied if the pipes break."""
        end = time.monotonic() + budget
        self._write(_LEN.pack(len(payload)) + payload, end)
        self._read(len(_ACK), end, ran=False)
        size = _LEN.unpack(self._read(_LEN.size, end, ran=True))[0]
        status, value = pickle.loads(self._read(size, end, ran=True))
        if status == "err":
            raise value
        return value

    def _write(self, data: bytes, end: float) -> None:
        view = memoryview(data)
        while view:
            left = end - time.monotonic()
            if left <= 0 or not select.select([], [self.wfd], [], left)[1]:
                raise TimeoutError
            try:
                view = view[os.write(self.wfd, view[: 1 << 16]) :]  # a short write loops
            except OSError as e:  # EPIPE: nobody reads, so the request is not whole anywhere
                raise _DiedBeforeTheCall(ran=False) from e

    def _read(self, n: int, end: float, *, ran: bool) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                raise TimeoutError
            try:
                chunk = os.read(self.rfd, min(n - len(buf), 1 << 20))
            except OSError as e:
                raise _WorkerDied.of(ran) from e
            if not chunk:  # EOF: the worker is gone
                raise _WorkerDied.of(ran)
            buf += chunk
        return bytes(buf)

    def kill(self) -> None:
        """Kill and close the pipes; never waited on here: it may be stuck in the kernel."""
        self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            assert pipe is not None
            pipe.close()  # nothing is buffered (writes go through os.write): cannot fail


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
        self._idle: list[_Worker] = []
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
        **kwargs: Any,
    ) -> Any:
        """Call ``target.method(*args, **kwargs)`` in a worker within the budget."""
        label = f"{what or method} on {self.label}"
        self._admit(label, target)
        return self._call(target, method, args, kwargs, deadline, label)

    def _admit(self, label: str, target: Any) -> None:
        with self._lock:
            until = self._open_until
        if until is not None:
            if self._clock() < until:
                raise StorageTimeoutError(
                    f"{label}: the mount is marked unhealthy after a timeout; failing fast for "
                    f"another {until - self._clock():.1f}s"
                )
            self._call(target, "probe", (), {}, None, f"probe of {self.label}")  # half-open
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
    ) -> Any:
        budget = self.op_timeout if deadline is None else min(self.op_timeout, deadline.remaining())
        payload = pickle.dumps((target, method, args, kwargs))
        if not self._slots.acquire(timeout=budget):
            raise StorageTimeoutError(f"{label}: no filesystem worker free within {budget:.1f}s")
        call = _Call(payload, type(target).__module__, deadline, label)
        try:
            return _FRESH_WORKER.call(lambda _: self._attempt(call), retry_on=(_DiedBeforeTheCall,))
        except _WorkerDied as e:
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

    def _run_on(self, worker: _Worker, call: _Call) -> Any:
        # The budget is the filesystem call's, measured once a worker is ready: starting a
        # Python is not the mount's fault (and on a loaded machine takes a second).
        budget = self.op_timeout
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
            sick = budget >= self.op_timeout
            self._abandon(worker, sick)
            why = "" if sick else " (the caller's deadline)"
            raise StorageTimeoutError(
                f"{call.label} did not return within {budget:.1f}s{why}"
            ) from None
        except SnapshotError:
            self._give_back(worker)
            raise
        except _WorkerDied:
            self._bury(worker)
            raise
        except BaseException:
            worker.kill()
            raise
        self._give_back(worker)
        return result

    def _start(self, worker: _Worker, call: _Call) -> None:
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

    def _take(self, label: str, module: str) -> tuple[_Worker, bool]:
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
            alive: list[_Worker] = []
            dead: list[_Worker] = []
            for w in self._idle:
                (alive if w.alive() else dead).append(w)
            self._idle = alive
            worker = alive.pop() if alive else None
        for w in dead:
            self._bury(w)
        if worker is not None:
            return worker, False
        try:
            return _Worker(module), True
        except OSError as e:
            with self._lock:
                self._busy -= 1
            raise BackendUnavailableError(f"{label}: cannot start a filesystem worker: {e}") from e

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def _bury(self, worker: _Worker) -> None:
        """Forget a worker that died (its pipes broke or poll() says so)."""
        worker.kill()
        with self._lock:
            self._died += 1
        self._reap(worker.proc)

    def _abandon(self, worker: _Worker, sick: bool) -> None:
        """Kill a worker whose call timed out (counted as stuck until it exits); ``sick``:
        the mount did not answer within op_timeout, so the breaker opens and the idle
        workers, which may have touched it too, go."""
        worker.kill()
        with self._lock:
            self._timeouts += 1
            self._abandoned.append(worker.proc)
            stale: list[_Worker] = []
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
        threading.Thread(target=proc.wait, daemon=True, name="guard-reaper").start()

    def close(self) -> None:
        """Stop the idle workers."""
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.kill()
            self._reap(w.proc)


def worker_main() -> None:
    """The child's loop: read a pickled call, run it, write back the pickled outcome."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    for module in sys.argv[1:]:  # the target's, so unpickling it costs nothing in a call
        with contextlib.suppress(Exception):  # unpickling the request will report it properly
            importlib.import_module(module)
    stdout.write(_READY)
    stdout.flush()
    while len(header := stdin.read(_LEN.size)) == _LEN.size:
        size = _LEN.unpack(header)[0]
        body = stdin.read(size)
        if len(body) != size:
            return  # the caller went away mid-request
        stdout.write(_ACK)  # before running: a death after this point may have had effects
        stdout.flush()
        target, method, args, kwargs = pickle.loads(body)
        try:
            out: tuple[str, Any] = ("ok", getattr(target, method)(*args, **kwargs))
        except SnapshotError as e:
            out = ("err", e)
        except OSError as e:
            out = ("err", BackendUnavailableError(f"{method}: {e}"))
        data = pickle.dumps(out)
        stdout.write(_LEN.pack(len(data)) + data)
        stdout.flush()
