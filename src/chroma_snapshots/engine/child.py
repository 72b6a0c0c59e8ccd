"""Child Pythons that import what their parent imports, and one-shot work run in one.

A Lambda's bootstrap puts the function's code (``/var/task``) and its layers on
``sys.path`` itself; ``PYTHONPATH`` names only the runtime. A plain ``python -c`` child
there cannot import this package, so every child gets the caller's ``sys.path`` first.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.errors import ProcessLimitError, StorageTimeoutError

_MARK = "chroma-snapshots-reply "  # the reply line: the work may print lines of its own


def python_argv(main: str, *args: str) -> list[str]:
    """The argv of a new Python that runs ``main`` ("package.module:function", called with
    no arguments) with the caller's ``sys.path``; the function finds ``args`` in
    ``sys.argv[1:]``."""
    module, function = main.split(":")
    boot = (
        "import json, sys; sys.path[:] = json.loads(sys.argv.pop(1)); "
        f"from {module} import {function}; {function}()"
    )
    return [sys.executable, "-c", boot, json.dumps(sys.path), *args]


class ChildFailed(Exception):
    """The child crashed (killed by a signal) or ended without a reply."""


def run_once(main: str, args: list[str], what: str, deadline: Deadline | None) -> Any:
    """Run ``main`` in a child Python and return what it passed to :func:`reply`.

    ChildFailed if it crashed or gave no reply; StorageTimeoutError naming ``what`` if
    ``deadline`` passed first (the child is killed and reaped); ProcessLimitError if no
    child could be started.
    """
    try:
        done = subprocess.run(
            python_argv(main, *args),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=None if deadline is None else max(0.001, deadline.remaining()),
        )
    except subprocess.TimeoutExpired as e:  # run() has killed and reaped the child
        raise StorageTimeoutError(f"deadline exceeded during {what}") from e
    except OSError as e:  # EAGAIN, ENOMEM, no interpreter: at a limit on processes
        raise ProcessLimitError(f"cannot start a process for {what}: {e}") from e
    if done.returncode < 0:
        raise ChildFailed(f"crashed ({_signal_name(-done.returncode)})")
    replies = [ln for ln in done.stdout.splitlines() if ln.startswith(_MARK)]
    if done.returncode != 0 or not replies:
        last = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ChildFailed(f"failed: {last[0][:500]}")
    return json.loads(replies[-1][len(_MARK) :])


def reply(value: object) -> None:
    """In the child: hand ``value`` (JSON) back to :func:`run_once`."""
    print(_MARK + json.dumps(value), flush=True)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
