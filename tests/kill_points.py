"""Kill a worker process at a step it has provably reached.

The worker wraps its backend in :class:`StepMarker` (``--steps`` on its command line): before
every backend call it prints ``step <kind>`` (e.g. ``step put manifests``) and waits for the
parent's ``go``. :func:`run_to_step` answers ``go`` until the chosen occurrence of a step
kind, then SIGKILLs the worker while it waits there, so the kill lands mid-operation, at a
known step, never during interpreter start-up. The worker's other threads keep running
until the kill (a materializer is still writing files when it dies).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

from chroma_snapshots.backends.base import Backend
from chroma_snapshots.backends.wrapped import WrappedBackend

T = TypeVar("T")
STEP_WAIT = 120.0  # a worker that reports no step for this long is stuck: the test fails


def step_kind(op: str, key: str) -> str:
    """``op`` and the key's area: ``put packs``, ``get refs``, ``list manifests`` ..."""
    parts = key.split("/")
    return f"{op} {parts[1] if len(parts) > 1 and parts[1] else parts[0] or 'root'}"


_STEP_LOCK = threading.Lock()  # one step at a time, from any thread


def reached(kind: str, out: TextIO = sys.stdout, answers: TextIO = sys.stdin) -> None:
    """Announce step ``kind`` and wait for the parent's ``go`` (it may kill us instead)."""
    with _STEP_LOCK:
        out.write(f"step {kind}\n")
        out.flush()
        if answers.readline().strip() != "go":
            os._exit(3)  # the parent is gone: stop, as the kill would have


class StepMarker(WrappedBackend):
    """``inner``, announcing each call with :func:`reached` before making it."""

    def around(self, op: str, keys: tuple[str, ...], call: Callable[[], T]) -> T:
        reached(step_kind(op, keys[0] if keys else ""))
        return call()


STEPS = "--steps" in sys.argv  # this process is a worker run by run_to_step


def marked(backend: Backend) -> Backend:
    """``backend`` announcing its steps, if the worker was started with ``--steps``."""
    return StepMarker(backend) if STEPS else backend


@dataclass(frozen=True)
class KillAt:
    """The ``nth`` (from 1) step of kind ``kind`` after the worker printed ``after_lines``
    lines of its own output (e.g. after its first "published" line)."""

    kind: str
    nth: int = 1
    after_lines: int = 0


@dataclass
class Run:
    """What one worker run did: its steps in order, whether it was killed, its output."""

    steps: list[str] = field(default_factory=list)
    killed_at: str | None = None
    output: list[str] = field(default_factory=list)
    returncode: int | None = None


def run_to_step(cmd: list[str], target: KillAt | None, timeout: float = 600.0) -> Run:
    """Run ``cmd`` (a worker started with ``--steps``), SIGKILL it at ``target`` (None: let it
    finish). A worker that ends with an error fails the test unless it was killed."""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    run = Run()
    try:
        _answer(proc, lines, target, run, time.monotonic() + timeout)
    finally:
        proc.stdin.close()
        if run.killed_at is None and proc.poll() is None:
            proc.kill()  # the test failed while the worker was still running
        run.returncode = proc.wait(timeout=60)
        pump.join(60)  # the pipe ends with the process
        proc.stdout.close()
    assert run.killed_at is not None or run.returncode == 0, (run.returncode, run.output[-20:])
    return run


def _pump(stream: TextIO, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)  # end of output


def _answer(
    proc: subprocess.Popen[str],
    lines: queue.Queue[str | None],
    target: KillAt | None,
    run: Run,
    end: float,
) -> None:
    """Answer ``go`` to each step until ``target``, where the worker is killed."""
    assert proc.stdin is not None
    seen = 0
    while True:
        wait = max(0.0, min(STEP_WAIT, end - time.monotonic()))
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            raise AssertionError(f"the worker reported no step within {wait:.0f} s") from None
        if line is None:
            return
        if not line.startswith("step "):
            run.output.append(line)
            continue
        run.steps.append(line[5:])
        due = target is not None and len(run.output) >= target.after_lines
        if due and target is not None and line[5:] == target.kind:
            seen += 1
            if seen == target.nth:
                os.kill(proc.pid, signal.SIGKILL)  # it waits at this step for our answer
                run.killed_at = target.kind
                return
        proc.stdin.write("go\n")
        proc.stdin.flush()
