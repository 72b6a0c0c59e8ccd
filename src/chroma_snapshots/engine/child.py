"""Child Pythons that import what their parent imports, and one-shot work run in one.

A Lambda's bootstrap puts the function's code (``/var/task``) and its layers on
``sys.path`` itself; ``PYTHONPATH`` names only the runtime. So every child gets the
caller's ``sys.path`` as the first line of its stdin (a command line has a limit per
argument), and runs isolated (``-I``): a module in the current folder named like one the
boot imports (``json.py``) is not imported instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any, BinaryIO

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.errors import ProcessLimitError

_MARK = b"chroma-snapshots-reply "  # the reply line: the work may print lines of its own
_POLL = 0.05  # how often a wait for a child looks at its deadline (a call-off ends it)
_REAP = 1.0  # how long a killed child is waited for (one stuck in the kernel is left)
# a one-shot child dies with its caller (PR_SET_PDEATHSIG = 1; Linux), unless the caller
# died before it could ask
_DIE_WITH = (
    "import ctypes, os; ctypes.CDLL(None).prctl(1, 9); os.getppid() == {pid} or os._exit(1); "
)


def python_argv(main: str, *args: str, die_with_caller: bool = False) -> list[str]:
    """The argv of a new Python that reads the caller's ``sys.path`` (:func:`path_line`)
    from stdin, then runs ``main`` ("package.module:function", called with no arguments);
    the function finds ``args`` in ``sys.argv[1:]``. ``die_with_caller``: killed when the
    calling thread ends (only for a child that thread waits for)."""
    module, function = main.split(":")
    boot = (_DIE_WITH.format(pid=os.getpid()) if die_with_caller else "") + (
        "import json, sys; sys.path[:] = json.loads(sys.stdin.buffer.readline()); "
        f"from {module} import {function}; {function}()"
    )
    return [sys.executable, "-I", "-c", boot, *args]


def path_line() -> bytes:
    """The first line a child started by :func:`python_argv` reads."""
    return json.dumps(sys.path).encode() + b"\n"


class ChildFailed(Exception):
    """The child crashed (killed by a signal) or ended without a reply."""


def run_once(main: str, request: object, what: str, deadline: Deadline) -> Any:
    """Run ``main`` in a child Python, which reads ``request`` (JSON) with
    :func:`read_request`, and return what it passed to :func:`reply`.

    ChildFailed if it crashed or gave no reply; StorageTimeoutError naming ``what`` when
    ``deadline`` passes or is called off first, KeyboardInterrupt as it comes (the child
    is killed in each case); ProcessLimitError if no child could be started.
    """
    try:
        with _feed(path_line() + json.dumps(request).encode() + b"\n") as feed:
            proc = subprocess.Popen(
                python_argv(main, die_with_caller=True),
                stdin=feed,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
    except OSError as e:  # EAGAIN, ENOMEM, no interpreter: at a limit on processes
        raise ProcessLimitError(f"cannot start a process for {what}: {e}") from e
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=_POLL)
                break
            except subprocess.TimeoutExpired:
                deadline.check(what)
    except BaseException:  # the deadline, an interrupt: the child goes with the call
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=_REAP)
        raise
    return _reply(proc.returncode, out, err)


def _feed(data: bytes) -> BinaryIO:
    """``data`` in a file to be a child's stdin, not a pipe: writing to a pipe blocks once
    it is full until the child reads, and a child stuck before it reads would hold the
    caller past its deadline. In memory where the system has it (no disk to fill)."""
    if sys.platform == "linux":
        f: BinaryIO = os.fdopen(os.memfd_create("chroma-snapshots-request"), "w+b")
    else:
        f = tempfile.TemporaryFile()  # noqa: SIM115 - returned open: the caller closes it
    f.write(data)
    f.seek(0)
    return f


def _reply(returncode: int, out: bytes, err: bytes) -> Any:
    if returncode < 0:
        raise ChildFailed(f"crashed ({_signal_name(-returncode)})")
    replies = [ln for ln in out.splitlines() if ln.startswith(_MARK)]
    if returncode != 0 or not replies:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ChildFailed(f"failed: {last[0][:500]}")
    return json.loads(replies[-1][len(_MARK) :])


def read_request() -> Any:
    """In the child: the request :func:`run_once` was given."""
    return json.loads(sys.stdin.buffer.readline())


def reply(value: object) -> None:
    """In the child: hand ``value`` (JSON) back to :func:`run_once`."""
    sys.stdout.buffer.write(_MARK + json.dumps(value).encode() + b"\n")
    sys.stdout.flush()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
