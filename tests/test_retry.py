"""The one retry policy: attempts, backoff with jitter, the time limit, what is retried."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from chroma_snapshots.engine.retry import RetryPolicy


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def policy(t: FakeTime, **kw: object) -> RetryPolicy:
    return RetryPolicy(clock=t.clock, sleep=t.sleep, rand=lambda: 0.5, **kw)  # type: ignore[arg-type]


def flaky(failures: int, error: type[BaseException] = TimeoutError):  # type: ignore[no-untyped-def]
    seen: list[int] = []

    def fn(attempt: int) -> str:
        seen.append(attempt)
        if attempt <= failures:
            raise error(f"try {attempt}")
        return f"ok after {attempt}"

    return fn, seen


def test_retries_until_success_with_exponential_jittered_waits() -> None:
    t = FakeTime()
    fn, seen = flaky(3)
    assert policy(t, base=0.1, cap=10).call(fn, retry_on=(TimeoutError,)) == "ok after 4"
    assert seen == [1, 2, 3, 4]
    assert t.slept == [0.05, 0.1, 0.2]  # base * 2**n, halved by the (fixed) jitter draw


def test_waits_are_capped_and_jitter_can_be_off() -> None:
    t = FakeTime()
    p = policy(t, attempts=6, base=1.0, cap=3.0, jitter=False)
    assert list(p.waits()) == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_the_last_error_is_raised_when_attempts_are_spent() -> None:
    t = FakeTime()
    fn, seen = flaky(10)
    with pytest.raises(TimeoutError, match="try 3"):
        policy(t, attempts=3).call(fn, retry_on=(TimeoutError,))
    assert seen == [1, 2, 3]


def test_other_errors_are_not_retried() -> None:
    t = FakeTime()
    fn, seen = flaky(1, KeyError)
    with pytest.raises(KeyError):
        policy(t).call(fn, retry_on=(TimeoutError,))
    assert seen == [1]
    assert t.slept == []


def test_no_retry_starts_after_the_time_given() -> None:
    t = FakeTime()
    fn, seen = flaky(100)
    p = policy(t, attempts=math.inf, base=1.0, cap=1.0, jitter=False)
    with pytest.raises(TimeoutError):
        p.call(fn, retry_on=(TimeoutError,), within=3.5)
    assert seen == [1, 2, 3, 4]
    assert t.now <= 3.5


def test_on_retry_sees_each_retry() -> None:
    t = FakeTime()
    fn, _ = flaky(2)
    seen: list[tuple[int, str]] = []
    policy(t).call(fn, retry_on=(TimeoutError,), on_retry=lambda n, e: seen.append((n, str(e))))
    assert seen == [(1, "try 1"), (2, "try 2")]


def test_unbounded_attempts_stop_at_the_time_limit_without_overflowing() -> None:
    t = FakeTime()
    fn, seen = flaky(10**6)
    p = policy(t, attempts=math.inf, base=0.001, cap=0.001, jitter=False)
    with pytest.raises(TimeoutError):
        p.call(fn, retry_on=(TimeoutError,), within=5.0)  # 5,000 tries: past 2**1024
    assert len(seen) >= 4999


def test_a_time_limit_that_is_not_a_number_is_refused() -> None:
    fn, seen = flaky(1)
    with pytest.raises(ValueError, match="time limit"):
        policy(FakeTime()).call(fn, retry_on=(TimeoutError,), within=math.nan)
    assert seen == []


@pytest.mark.parametrize(
    "bad",
    [
        {"attempts": 0},
        {"attempts": 2.5},
        {"attempts": True},
        {"base": -1.0},
        {"cap": -1.0},
        {"base": math.inf},
        {"cap": math.nan},
    ],
)
def test_a_nonsense_policy_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(**bad)  # type: ignore[arg-type]


def test_publish_client_retakes_no_copy_past_its_deadline(tmp_path: Path) -> None:
    """A database that never validates (SQLite, but not chroma's) is retaken up to
    ``attempts`` times, but no retake starts after the deadline: the answer is a timeout."""
    import sqlite3

    from chroma_snapshots import RemoteStore, StorageTimeoutError, open_backend
    from chroma_snapshots.chroma import publish_client

    db = tmp_path / "db"
    db.mkdir()
    with sqlite3.connect(db / "chroma.sqlite3") as con:
        con.execute("create table t (x)")
    con.close()
    store = RemoteStore(open_backend(f"file://{tmp_path}/store"))
    with pytest.raises(StorageTimeoutError, match="retaking the copy"):
        publish_client(store, "db", db, attempts=1000, deadline=0.001)
    assert list(store.names()) == []
