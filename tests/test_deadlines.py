"""Deadlines end work on time: injected clocks, the hang guard, stalled S3 bodies, Lambda."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from chroma_snapshots import Deadline, IntegrityError, RemoteStore, StorageTimeoutError
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine import deadline as deadline_module
from chroma_snapshots.engine.deadline import WorkerPool, run_within, wait_all, within
from chroma_snapshots.engine.guard import MountGuard
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.faults import FaultPlan, Sleeper
from chroma_snapshots.testing.proxy import CountingProxy


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_deadline_with_an_injected_clock() -> None:
    clock = Clock()
    dl = Deadline(10, clock=clock)
    assert dl.remaining() == 10
    child = dl.child(3)
    clock.now += 4
    assert child.expired()
    assert dl.remaining() == 6
    assert dl.child(100).remaining() == 6  # a child never outlives its parent
    clock.now += 7
    with pytest.raises(StorageTimeoutError, match="publishing"):
        dl.check("publishing")


class FakeLambdaContext:
    def __init__(self, remaining_ms: int) -> None:
        self._end = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self._end - time.monotonic()) * 1000)


def test_guard_times_out_fails_fast_and_recovers(tmp_path: Path) -> None:
    clock = Clock()
    blocked = tmp_path / "blocked"
    guard = MountGuard("test-mount", op_timeout=1.0, cooldown=30, clock=clock)
    target = Sleeper(blocked)
    assert guard.run(target, "echo", {"x": [1, 2]}) == {"x": [1, 2]}
    with pytest.raises(IntegrityError):  # the library's own errors cross the process boundary
        guard.run(target, "fail")
    t = time.monotonic()
    with pytest.raises(StorageTimeoutError, match="sleep on test-mount"):
        guard.run(target, "sleep", 60)
    assert time.monotonic() - t < 2.0
    assert not guard.stats().healthy
    t = time.monotonic()
    with pytest.raises(StorageTimeoutError, match="unhealthy"):
        guard.run(target, "echo", 1)
    # fails fast: well inside the 1 s the worker would have been given (the latency target,
    # < 50 ms, is measured by benchmarks/breaker.py)
    assert time.monotonic() - t < 0.5
    blocked.touch()  # still down when the cool-down ends: the probe fails, the breaker stays open
    clock.now += 31
    with pytest.raises(StorageTimeoutError):
        guard.run(target, "echo", 1)
    blocked.unlink()
    clock.now += 31
    assert guard.run(target, "echo", 2) == 2
    assert guard.stats().healthy
    assert guard.stats().timeouts == 2
    guard.close()


def test_guard_budget_follows_the_callers_deadline(tmp_path: Path) -> None:
    guard = MountGuard("m", op_timeout=30)
    # the worker started first: on a loaded machine its start alone took more than 0.5 s
    # ("a filesystem worker did not start within 0.5s"), which is not what this measures
    assert guard.run(Sleeper(tmp_path / "b"), "echo", 1, deadline=Deadline(30)) == 1
    t = time.monotonic()
    with pytest.raises(StorageTimeoutError, match="the caller's deadline"):
        guard.run(Sleeper(tmp_path / "b"), "sleep", 60, deadline=Deadline(0.5))
    assert time.monotonic() - t < 1.5
    # A call cut short by its caller's deadline says nothing of the mount: the breaker
    # stays closed and the same guard serves the next call (it failed fast for 30 s).
    assert guard.stats().healthy
    assert guard.stats().timeouts == 1
    assert guard.run(Sleeper(tmp_path / "b"), "echo", 7, deadline=Deadline(20)) == 7
    guard.close()


def _s3_store(proxy: CountingProxy, bucket: str, **settings: float) -> RemoteStore:
    s = S3Settings(endpoint_url=proxy.url, connect_timeout=1, max_attempts=2, **settings)  # type: ignore[arg-type]
    return RemoteStore(S3Backend(bucket, "snaps", settings=s), chunk_size=4096, pack_target=1 << 16)


@pytest.fixture
def published(moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> Path:
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(200_000)})
    with CountingProxy(moto_server.endpoint_url) as proxy:
        _s3_store(proxy, s3_bucket).publish("db", src)
    return src


def test_stalled_body_is_retried(
    moto_server: MotoServer, s3_bucket: str, published: Path, tmp_path: Path
) -> None:
    with CountingProxy(moto_server.endpoint_url) as proxy:
        store = _s3_store(proxy, s3_bucket, read_timeout=1.0)
        proxy.stall("/packs/", count=1, after_bytes=100)
        t = time.monotonic()
        snap = store.checkout("db", dest=tmp_path / "out", deadline=15)
        assert time.monotonic() - t < 10
        assert read_tree(snap.path) == read_tree(published)
        pack_gets = [r for r in proxy.requests if "/packs/" in r.path]
        assert len(pack_gets) > len({r.path for r in pack_gets})  # one read was made twice


def test_stalled_server_fails_within_the_deadline(
    moto_server: MotoServer, s3_bucket: str, published: Path, tmp_path: Path
) -> None:
    with CountingProxy(moto_server.endpoint_url) as proxy:
        store = _s3_store(proxy, s3_bucket, read_timeout=30.0)  # only the deadline can end it
        proxy.stall("/packs/", count=1000, after_bytes=100)
        ctx = FakeLambdaContext(remaining_ms=3000)
        t = time.monotonic()
        with pytest.raises(StorageTimeoutError):
            store.checkout(
                "db", dest=tmp_path / "out", deadline=Deadline.from_lambda_context(ctx, reserve=1.0)
            )
        assert 1.5 < time.monotonic() - t < 3.0
        assert not (tmp_path / "out").exists()


@pytest.fixture
def drained() -> None:
    """No call an earlier test abandoned is still running (the stalled reads above return
    once their proxy stops): the counts these tests expect are not moved by them."""
    for _ in range(3000):  # no timing asserted: just wait, bounded
        if deadline_module.abandoned_calls() == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"{deadline_module.abandoned_calls()} abandoned calls still running")


@pytest.mark.usefixtures("drained")
def test_calls_a_deadline_abandoned_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each timed-out call leaves its thread running; past the cap a new call is refused at
    once (nothing started), and once the stuck calls return, calls run again."""
    monkeypatch.setattr(deadline_module, "MAX_ABANDONED", deadline_module.abandoned_calls() + 3)
    gate, started = threading.Event(), []

    def stuck() -> None:
        started.append(1)
        gate.wait(30)

    try:
        for _ in range(3):
            with pytest.raises(StorageTimeoutError, match="did not finish"):
                run_within(Deadline(0.05), "a hung call", stuck)
        with pytest.raises(StorageTimeoutError, match=r"abandoned .* still running"):
            run_within(Deadline(5), "one more", stuck)
        assert len(started) == 3  # the refused call never ran
    finally:
        gate.set()
    for _ in range(500):  # the three threads return (no timing asserted: just wait)
        if deadline_module.abandoned_calls() < deadline_module.MAX_ABANDONED:
            break
        time.sleep(0.01)
    assert run_within(Deadline(5), "after", lambda: 42) == 42


def _join_pool(name: str) -> None:
    """Wait for the threads of the pool named ``name`` to exit (their calls returned)."""
    for t in [t for t in threading.enumerate() if t.name == name]:
        t.join(30)
        assert not t.is_alive()


@pytest.mark.usefixtures("drained")
def test_calls_left_running_by_a_failure_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call still running when a sibling's failure (or any exception) leaves its pool
    holds a thread just as one a deadline abandoned: it is counted, once, until it returns,
    and past the cap a new pool is refused."""
    before = deadline_module.abandoned_calls()
    monkeypatch.setattr(deadline_module, "MAX_ABANDONED", before + 2)
    gate, started = threading.Event(), threading.Event()

    def stuck() -> None:
        started.set()
        gate.wait(30)

    def broken() -> None:
        started.wait(30)  # fail only once the other call is surely running
        raise OSError("connection reset")

    try:
        with WorkerPool(2, name="left-by-a-failure") as pool:  # a sibling fails fast
            futures = [pool.submit(stuck), pool.submit(broken)]
            with pytest.raises(OSError, match="reset"):
                wait_all(futures, Deadline(30), "reading packs")
        assert deadline_module.abandoned_calls() == before + 1
        started.clear()

        def caller_fails() -> None:
            with WorkerPool(1, name="left-by-an-exception") as pool:
                pool.submit(stuck)
                started.wait(30)
                raise KeyError("the caller failed")

        with pytest.raises(KeyError):
            caller_fails()
        assert deadline_module.abandoned_calls() == before + 2
        with pytest.raises(StorageTimeoutError, match="still running"):
            WorkerPool(1)
    finally:
        gate.set()
    _join_pool("left-by-a-failure")
    _join_pool("left-by-an-exception")
    assert deadline_module.abandoned_calls() == before  # each counted once, and released


@pytest.mark.usefixtures("drained")
def test_finished_calls_are_not_counted() -> None:
    """Leaving a pool whose calls all returned counts nothing, and a call a deadline
    abandoned is counted once (by its pool, not again by the wait)."""
    before = deadline_module.abandoned_calls()
    for _ in range(20):
        assert run_within(Deadline(5), "quick", lambda: 1) == 1
    assert deadline_module.abandoned_calls() == before
    gate = threading.Event()
    try:
        with pytest.raises(StorageTimeoutError, match="did not finish"):
            run_within(Deadline(0.05), "a hung call", lambda: gate.wait(30))
        assert deadline_module.abandoned_calls() == before + 1
    finally:
        gate.set()
    _join_pool("deadline:a hung call")
    assert deadline_module.abandoned_calls() == before


def test_a_failure_raised_through_wait_all_keeps_nothing_of_the_caller_alive() -> None:
    """A failed call's error, raised by wait_all, must not form a reference cycle through
    wait_all's frame: it kept a publish's whole file list alive until a full collection."""
    import gc
    import weakref

    class Data:  # a stand-in for the caller's file list
        pass

    def boom() -> None:
        raise ValueError("boom")

    def operation(data: Data) -> None:
        with WorkerPool(1) as pool:
            wait_all([pool.submit(boom)], Deadline(5), "the call")

    data = Data()
    alive = weakref.ref(data)
    gc.disable()
    try:
        with pytest.raises(ValueError, match="boom"):
            operation(data)
        del data
        assert alive() is None  # freed by reference counting alone
    finally:
        gc.enable()


def test_no_request_goes_out_after_its_calls_deadline(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # A retry botocore schedules is not sent once the call's deadline has passed: the caller
    # was told it timed out, and a write landing later could outlive the claims covering it.
    plan = FaultPlan(1.0, kinds=("500",))  # each attempt lands, and is answered with a 500
    with CountingProxy(moto_server.endpoint_url, faults=plan) as proxy:
        s = S3Settings(endpoint_url=proxy.url, connect_timeout=1, max_attempts=5)
        backend = S3Backend(s3_bucket, "snaps", settings=s)
        dl = Deadline(0.5, clock=lambda: float(sum(plan.counts.values())))  # after one
        with pytest.raises(StorageTimeoutError, match=r"PUT .* is not sent"):
            within(dl, lambda: backend.put("db/refs/latest", b"{}"))
        assert sum(plan.counts.values()) == 1


def test_a_listing_of_the_top_level_that_times_out_says_so(tmp_path: Path) -> None:
    # a tiny deadline (--timeout 1e-320) named "list " with an empty prefix
    from chroma_snapshots.backends.bounded import DeadlineBackend
    from chroma_snapshots.backends.file import FileBackend

    io = DeadlineBackend(FileBackend(tmp_path), Deadline(1e-320))
    for call in (lambda: list(io.list("")), lambda: io.list_dirs("")):
        with pytest.raises(StorageTimeoutError, match="list of the store's top level"):
            call()
    with pytest.raises(StorageTimeoutError, match="list refs/ did not"):
        io.list("refs/")
