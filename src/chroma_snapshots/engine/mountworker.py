"""The hang guard's worker process: one child that runs pickled filesystem calls, and its
pipe protocol, both ends (:class:`Worker` in the caller, :func:`worker_main` in the child).

A request is a length-prefixed pickle of (target, method, args, kwargs). The child
acknowledges it once it holds all of it, before running it, so a death without the
acknowledgement proves the call never ran; then it sends the length-prefixed pickled
outcome. The caller never waits past its budget on either pipe, and never waits for
the child itself: it may be stuck in the kernel."""

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
import time
from typing import Any

from chroma_snapshots.engine.child import path_line, python_argv
from chroma_snapshots.errors import BackendUnavailableError, SnapshotError

_LEN = struct.Struct("!Q")
_ACK = b"\x01"  # sent by a worker once it holds the whole request, before running it
_READY = b"\x02"  # sent by a new worker once Python started and its target's module loaded
_MAIN = "chroma_snapshots.engine.mountworker:worker_main"


def request(target: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """The request for ``target.method(*args, **kwargs)``, as :meth:`Worker.call` sends it."""
    return pickle.dumps((target, method, args, kwargs))


class WorkerDied(Exception):
    """The worker's pipes broke; ``ran`` says whether it may have run the call."""

    def __init__(self, ran: bool) -> None:
        super().__init__("the filesystem worker died" + (" during the call" if ran else ""))
        self.ran = ran

    @staticmethod
    def of(ran: bool) -> WorkerDied:
        return WorkerDied(True) if ran else DiedBeforeTheCall(False)


class DiedBeforeTheCall(WorkerDied):
    """The worker died before it acknowledged the call: it never ran."""


class Worker:
    def __init__(self, preload: str) -> None:
        self.proc = subprocess.Popen(  # OSError (no fds, no memory) is the caller's to map
            python_argv(_MAIN, preload),
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
        """Start a new worker (the caller's ``sys.path`` first) and wait for it to be
        ready; TimeoutError past ``budget``."""
        end = time.monotonic() + budget
        self._write(path_line(), end)
        if self._read(len(_READY), end, ran=False) != _READY:
            raise DiedBeforeTheCall(ran=False)

    def call(self, payload: bytes, budget: float) -> Any:
        """Run one request; TimeoutError past ``budget``, WorkerDied if the pipes break."""
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
                raise DiedBeforeTheCall(ran=False) from e

    def _read(self, n: int, end: float, *, ran: bool) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                raise TimeoutError
            try:
                chunk = os.read(self.rfd, min(n - len(buf), 1 << 20))
            except OSError as e:
                raise WorkerDied.of(ran) from e
            if not chunk:  # EOF: the worker is gone
                raise WorkerDied.of(ran)
            buf += chunk
        return bytes(buf)

    def kill(self) -> None:
        """Kill and close the pipes; never waited on here: it may be stuck in the kernel."""
        self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            assert pipe is not None
            pipe.close()  # nothing is buffered (writes go through os.write): cannot fail


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
