"""Making a deadline pass right after one step of an operation, deterministically: the step
runs, then the injected clock jumps (tests of what an operation does once it is late)."""

from __future__ import annotations

from typing import Any

import pytest


def late_after(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, now: list[float]) -> None:
    """Replace ``owner.name`` (a function, or a method on its class) by one that calls it
    and then moves ``now[0]`` 100 s on, past any deadline the test's clock gives."""
    real = getattr(owner, name)

    def step_then_late(*args: Any, **kw: Any) -> Any:
        got = real(*args, **kw)
        now[0] += 100.0
        return got

    monkeypatch.setattr(owner, name, step_then_late)
