"""Lease locks on S3 (conditional object writes) and DynamoDB (condition expressions),
through moto's HTTP server, with one conformance class."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from chroma_snapshots import InvalidInputError, LockError, StorageTimeoutError
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine.cleanup import wait_for_cleanups
from chroma_snapshots.locking import DynamoDBLeaseLock, LeaseLock, ObjectLeaseLock
from chroma_snapshots.testing import MotoServer


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class RealClock(Clock):
    """Wall time, for the background renewals of ``kept``."""

    def __call__(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class LeaseLockTests:
    @pytest.fixture
    def make(self) -> Any:
        raise NotImplementedError

    @pytest.fixture
    def stall(self) -> Callable[[LeaseLock], None]:
        """Makes every later call of a lock to its store hang (until the test ends)."""
        raise NotImplementedError

    def test_a_lease_of_its_own_that_landed_late_is_taken_back(self, make: Any) -> None:
        """An acquire that timed out after its create landed leaves a lease under the lock's
        own owner id: the next acquire takes it back at once instead of waiting a ttl."""
        clock = Clock()
        landed = make("a", clock).acquire(timeout=0)  # what the timed-out call wrote
        again = make("a", clock).acquire(timeout=0)
        assert again.generation == landed.generation + 1
        with pytest.raises(LockError, match="held by a"):
            make("b", clock).acquire(timeout=0)

    def test_a_release_that_landed_late_may_be_given_again(self, make: Any) -> None:
        a = make("a", Clock())
        lease = a.acquire(timeout=0)
        a.release(lease)
        a.release(lease)  # the retry of a release whose answer was lost
        with pytest.raises(LockError):
            a.heartbeat(lease)

    @pytest.mark.parametrize("timeout", [-1.0, float("nan")])
    def test_a_negative_timeout_is_bad_input(self, make: Any, timeout: float) -> None:
        with pytest.raises(InvalidInputError, match="lock timeout must be >= 0"):
            make("a", Clock()).acquire(timeout=timeout)

    def test_no_timeout_means_the_default(self, make: Any) -> None:
        a = make("a", Clock())
        a.release(a.acquire(timeout=None))

    def test_a_hung_store_costs_acquire_its_timeout_not_more(
        self, make: Any, stall: Callable[[LeaseLock], None]
    ) -> None:
        a = make("a", RealClock(), 30.0)
        stall(a)
        t0 = time.monotonic()
        with pytest.raises(StorageTimeoutError):
            a.acquire(timeout=0.5)
        # the stalled call would last the whole test: only a bound ends it this early
        assert time.monotonic() - t0 < 5.0

    def test_a_hung_store_costs_heartbeat_and_release_their_deadline(
        self, make: Any, stall: Callable[[LeaseLock], None]
    ) -> None:
        a = make("a", RealClock(), 30.0)
        lease = a.acquire(timeout=0)
        stall(a)
        t0 = time.monotonic()
        with pytest.raises(StorageTimeoutError):
            a.heartbeat(lease, deadline=0.3)
        with pytest.raises(StorageTimeoutError):
            a.release(lease, deadline=0.3)
        assert time.monotonic() - t0 < 5.0

    def test_kept_ends_with_the_callers_time_on_a_hung_store(
        self, make: Any, stall: Callable[[LeaseLock], None], caplog: pytest.LogCaptureFixture
    ) -> None:
        """The caller waits for the release after the block only for its time left, not
        the lock's ttl (30 s here) nor its io_timeout: a hung store never holds the caller.
        The release goes on in the background, bounded by io_timeout, and says it failed."""
        a = make("a", RealClock(), 30.0)
        a.io_timeout = 1.0
        lease = a.acquire(timeout=0)
        stall(a)
        end = time.monotonic() + 0.5
        caplog.set_level(logging.WARNING, logger="chroma_snapshots.locking")
        t0 = time.monotonic()
        with a.kept(lease, remaining=lambda: end - time.monotonic()):
            pass
        assert time.monotonic() - t0 < 5.0
        assert wait_for_cleanups(timeout=10.0)
        assert "not released: StorageTimeoutError" in caplog.text

    def test_acquire_release_and_fencing(self, make: Any) -> None:
        clock = Clock()
        a, b = make("a", clock), make("b", clock)
        first = a.acquire(timeout=0)
        with pytest.raises(LockError):
            b.acquire(timeout=1)  # held: b waits (fake time) and gives up
        a.release(first)
        second = b.acquire(timeout=0)
        assert second.generation == first.generation + 1
        b.release(second)
        with a.hold(timeout=0) as third:
            assert third.generation == second.generation + 1

    def test_expiry_steal_and_stale_holder(self, make: Any) -> None:
        clock = Clock()
        a, b = make("a", clock), make("b", clock)
        lease = a.acquire(timeout=0)
        clock.now += 30
        lease = a.heartbeat(lease)  # extends to now + ttl
        clock.now += 59
        with pytest.raises(LockError):
            b.acquire(timeout=0)  # not expired yet thanks to the heartbeat
        clock.now += 2
        stolen = b.acquire(timeout=0)
        assert stolen.generation == lease.generation + 1
        with pytest.raises(LockError):
            a.heartbeat(lease)  # the old holder learns it lost the lock
        with pytest.raises(LockError):
            a.release(lease)  # and cannot release someone else's lease
        b.release(stolen)

    def test_non_owner_cannot_heartbeat_or_release(self, make: Any) -> None:
        clock = Clock()
        a, b = make("a", clock), make("b", clock)
        lease = a.acquire(timeout=0)
        forged = type(lease)("b", lease.generation, lease.expires_at)
        with pytest.raises(LockError):
            b.heartbeat(forged)
        with pytest.raises(LockError):
            b.release(forged)
        a.release(lease)
        b.release(b.acquire(timeout=0))  # taken over after the release
        with pytest.raises(LockError):
            a.release(lease)  # no longer its own to give back

    # kept(): renewed in the background on wall time (ttl 1 s, renewed every third of it)

    def test_a_kept_lease_outlives_its_ttl_and_is_released(self, make: Any) -> None:
        a, b = make("a", RealClock(), 1.0), make("b", RealClock(), 1.0)
        lease = a.acquire(timeout=0)
        with a.kept(lease) as keeper:
            time.sleep(2.5)  # two and a half ttls
            with pytest.raises(LockError):
                b.acquire(timeout=0)
        assert keeper.lost is None
        assert keeper.lease.expires_at > lease.expires_at
        b.release(b.acquire(timeout=0))  # released when the block ended

    def test_a_lost_lease_is_logged_not_raised(
        self, make: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        a, b = make("a", RealClock(), 1.0), make("b", RealClock(), 1.0)
        lease = a.acquire(timeout=0)
        caplog.set_level(logging.WARNING, logger="chroma_snapshots.locking")
        with a.kept(lease, remaining=lambda: 0.0):  # past its deadline: not renewed
            time.sleep(1.5)
            stolen = b.acquire(timeout=0)  # it lapsed: taken over
        assert "not released" in caplog.text
        b.release(stolen)

    def test_a_lease_kept_past_the_works_deadline_is_still_released(self, make: Any) -> None:
        """The work ran out of time holding the lease (a compaction at its deadline): the
        release is a clean-up, not work, and is still made. Made with the spent deadline,
        it failed at once and the next holders waited out the whole ttl."""
        a, b = make("a", RealClock(), 60.0), make("b", RealClock(), 60.0)
        lease = a.acquire(timeout=0)
        with a.kept(lease, remaining=lambda: 0.0):
            pass
        b.release(b.acquire(timeout=0))  # free at once, not in 60 s

    @pytest.mark.parametrize("error", [ConnectionResetError(104, "reset"), RuntimeError("x")])
    def test_a_release_the_store_fails_is_logged_not_raised(
        self,
        make: Any,
        error: Exception,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """What the block did stands whatever the release meets (not only LockError)."""
        a = make("a", RealClock(), 30.0)
        lease = a.acquire(timeout=0)

        def fail(_: Any, **__: Any) -> None:
            raise error

        monkeypatch.setattr(a, "release", fail)
        caplog.set_level(logging.WARNING, logger="chroma_snapshots.locking")
        with a.kept(lease):
            done = True
        assert done
        assert f"not released: {type(error).__name__}" in caplog.text


def _options(owner: str, clock: Clock, ttl: float) -> dict[str, Any]:
    return {"owner": owner, "ttl": ttl, "clock": clock, "sleep": clock.sleep}


class TestObjectLeaseLockOnS3(LeaseLockTests):
    @pytest.fixture
    def make(self, moto_server: MotoServer, s3_bucket: str) -> Any:
        backend = S3Backend(s3_bucket, settings=S3Settings(endpoint_url=moto_server.endpoint_url))
        key = f"locks/{uuid.uuid4().hex}"

        def make(owner: str, clock: Clock, ttl: float = 60.0) -> LeaseLock:
            return ObjectLeaseLock(backend, key, **_options(owner, clock, ttl))

        return make

    @pytest.fixture
    def stall(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[LeaseLock], None]]:
        with _stalled() as hang:

            def stall(lock: LeaseLock) -> None:
                assert isinstance(lock, ObjectLeaseLock)
                monkeypatch.setattr(lock, "backend", _HungBackend(lock.backend, hang))

            yield stall


class TestDynamoDBLeaseLock(LeaseLockTests):
    @pytest.fixture
    def make(self, moto_server: MotoServer) -> Any:
        client = moto_server.client_for("dynamodb")
        table = f"locks-{uuid.uuid4().hex[:8]}"
        client.create_table(
            TableName=table,
            BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "lock_id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "lock_id", "AttributeType": "S"}],
        )

        def make(owner: str, clock: Clock, ttl: float = 60.0) -> LeaseLock:
            return DynamoDBLeaseLock(client, table, "compactor", **_options(owner, clock, ttl))

        return make

    @pytest.mark.parametrize(
        "item",
        [
            {},  # no owner: a raw KeyError before
            {"owner": {"N": "1"}, "generation": {"N": "1"}, "expires_at": {"N": "1"}},
            {"owner": {"S": "x"}, "generation": {"S": "one"}, "expires_at": {"N": "1"}},
        ],
    )
    def test_an_item_that_is_not_a_lease_is_a_lock_error(
        self, moto_server: MotoServer, make: Any, item: dict[str, Any]
    ) -> None:
        lock = make("a", Clock())
        client = lock.client
        client.put_item(TableName=lock.table, Item={"lock_id": {"S": "compactor"}, **item})
        with pytest.raises(LockError, match="is malformed"):
            lock.acquire(timeout=0)

    @pytest.fixture
    def stall(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[LeaseLock], None]]:
        with _stalled() as hang:

            def stall(lock: LeaseLock) -> None:
                assert isinstance(lock, DynamoDBLeaseLock)
                for op in ("get_item", "put_item"):
                    monkeypatch.setattr(lock.client, op, hang)

            yield stall


@contextmanager
def _stalled() -> Iterator[Callable[..., Any]]:
    """A call that blocks until the test is over (then the abandoned threads end)."""
    release = threading.Event()

    def hang(*_: Any, **__: Any) -> Any:
        release.wait(60)
        raise ConnectionResetError(104, "released by the test")

    try:
        yield hang
    finally:
        release.set()


class _HungBackend(FileBackend):
    """Every call hangs (a stalled S3 connection, a hung mount)."""

    def __init__(self, inner: Any, hang: Callable[..., Any]) -> None:
        self.inner, self.hang = inner, hang

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> Any:
        return self.hang()

    def put(self, key: str, data: bytes, *, mode: Any = None) -> Any:
        return self.hang()
