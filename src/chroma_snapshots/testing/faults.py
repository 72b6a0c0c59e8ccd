"""Small fault injectors for tests of the hang guard and deadlines."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import IntegrityError


class Sleeper:
    """A picklable target for MountGuard tests: it answers, fails, or blocks on demand.

    ``probe`` blocks while the file ``blocked`` exists, so a test can make the
    "mount" recover without any shared memory.
    """

    def __init__(self, blocked: Path) -> None:
        self.blocked = blocked

    def echo(self, value: object) -> object:
        return value

    def fail(self) -> None:
        raise IntegrityError("injected failure")

    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "woke"

    def probe(self) -> None:
        while self.blocked.exists():
            time.sleep(0.01)
