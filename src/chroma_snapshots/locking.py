"""Lease locks: an efficiency measure for compactors (correctness comes from CAS on refs).

A lease has an owner, an expiry and a fencing generation that grows by one every time
the lock changes hands; a publish records it, so an operator can tell which holder
wrote a version. Heartbeats and releases are conditioned on the owner and generation;
a lock can be taken over only after it expired; ``LeaseLock.kept`` renews a lease in the
background while work goes on. ``LeaseLock`` holds the protocol (after
filelock's small template classes); a store implements three conditional operations:

- :class:`ObjectLeaseLock`: one object on any Backend with conditional writes
  (``PutMode.CREATE`` / ``PutMode.update(etag)``), e.g. S3;
- :class:`DynamoDBLeaseLock`: one DynamoDB item with condition expressions.

Every call to the store is bounded: ``acquire`` by its ``timeout`` (one look by
``io_timeout``), ``heartbeat`` and ``release`` by the deadline they are given (by default
``io_timeout``); a store that does not answer in time is a StorageTimeoutError, and
``kept`` bounds its renewals and its release by the caller's time left.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

from chroma_snapshots.backends.base import Backend, PutMode
from chroma_snapshots.backends.bounded import DeadlineBackend
from chroma_snapshots.engine.cleanup import clean_up
from chroma_snapshots.engine.deadline import (
    Deadline,
    DeadlineLike,
    as_deadline,
    run_within,
    start_thread,
)
from chroma_snapshots.engine.retry import RetryPolicy
from chroma_snapshots.errors import (
    ConflictError,
    InvalidInputError,
    LockError,
    ProcessLimitError,
    SnapshotNotFoundError,
    StorageTimeoutError,
)

log = logging.getLogger(__name__)


class _Held(Exception):
    """The lock is held by someone else's unexpired lease."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(lease.owner)
        self.lease = lease


@dataclass(frozen=True)
class Lease:
    """Who holds the lock, until when (epoch seconds), and the fencing generation."""

    owner: str
    generation: int
    expires_at: float


def _lease(obj: object) -> Lease:
    """A lease read back; TypeError unless each field has its type (a string expiry was
    compared with the clock deep inside acquire: a raw TypeError)."""
    lease = Lease(**obj) if isinstance(obj, dict) else None
    if (
        lease is None
        or not isinstance(lease.owner, str)
        or type(lease.generation) is not int
        or type(lease.expires_at) not in (int, float)
    ):
        raise TypeError("not a lease")
    return lease


def default_owner() -> str:
    """host:pid:random, unique per lock holder."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseLock(ABC):
    """Acquire, heartbeat and release a lease; subclasses store it conditionally.

    ``clock`` is wall time (leases are compared across hosts); ``sleep`` and ``clock``
    are injectable so tests need not wait. ``io_timeout`` bounds a call to the store when
    the caller gives no deadline.
    """

    def __init__(
        self,
        *,
        ttl: float = 60.0,
        owner: str | None = None,
        poll: float = 0.2,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        io_timeout: float = 10.0,
    ) -> None:
        self.ttl, self.poll, self.io_timeout = ttl, poll, io_timeout
        self.owner = owner or default_owner()
        self._clock, self._sleep = clock, sleep

    # What a store provides: read with a version token, create-if-absent, compare-and-swap.

    # Each returns or raises by ``dl`` (StorageTimeoutError).

    @abstractmethod
    def _read(self, dl: Deadline) -> tuple[Lease, object] | None:
        """The stored lease and a token for :meth:`_swap`, or None if there is none."""

    @abstractmethod
    def _create(self, lease: Lease, dl: Deadline) -> None:
        """Store ``lease`` if nothing is stored; ConflictError otherwise."""

    @abstractmethod
    def _swap(self, lease: Lease, token: object, dl: Deadline) -> None:
        """Replace the stored lease if it is still the one ``token`` came with (ConflictError)."""

    # The protocol.

    def acquire(self, timeout: float | None = 30.0) -> Lease:
        """Take the lock, looking again every ``poll`` seconds for up to ``timeout`` seconds
        for the holder to release or its lease to expire. LockError if that does not happen
        in time (``timeout=0``: one look, bounded by ``io_timeout``); StorageTimeoutError if
        the store does not answer within ``timeout`` (None: 30 s). A lock object is one
        holder: a lease with its owner id is its own (a create that timed out but landed),
        taken back, not waited for."""
        timeout = 30.0 if timeout is None else timeout
        if not timeout >= 0:
            raise InvalidInputError(f"lock timeout must be >= 0 seconds, not {timeout!r}")
        dl = Deadline(timeout if timeout > 0 else self.io_timeout)
        policy = RetryPolicy(
            attempts=math.inf, base=self.poll, cap=self.poll, jitter=False,
            clock=self._clock, sleep=self._sleep,
        )  # fmt: skip
        try:
            return policy.call(
                lambda _: self._take(dl), retry_on=(_Held, ConflictError), within=timeout
            )
        except _Held as e:
            raise LockError(
                f"lock held by {e.lease.owner} until {e.lease.expires_at:.0f}"
            ) from None
        except ConflictError as e:  # others kept moving first until the time was up
            raise LockError(f"lost every race for the lock within {timeout:.1f}s") from e

    def _take(self, dl: Deadline) -> Lease:
        """One look: create the lease, or take over a released or expired one. _Held if
        someone holds it, ConflictError if someone else moved first."""
        found = self._read(dl)
        now = self._clock()
        mine = Lease(self.owner, 1, now + self.ttl)
        if found is None:
            self._create(mine, dl)
            return mine
        held, token = found
        if held.expires_at > now and held.owner != self.owner:
            raise _Held(held)
        mine = replace(mine, generation=held.generation + 1)
        self._swap(mine, token, dl)
        return mine

    def heartbeat(self, lease: Lease, *, deadline: DeadlineLike = None) -> Lease:
        """Extend ``lease``; LockError if it is no longer ours (expired and taken over)."""
        dl = as_deadline(deadline, self.io_timeout)
        token = self._owned(lease, self._read(dl))
        renewed = replace(lease, expires_at=self._clock() + self.ttl)
        self._swap_or_lost(renewed, token, dl)
        return renewed

    def release(self, lease: Lease, *, deadline: DeadlineLike = None) -> None:
        """Give the lock back (keeping the generation); LockError if it is not ours. Giving
        back a lease already given back (a release that timed out but landed) is a no-op."""
        dl = as_deadline(deadline, self.io_timeout)
        found = self._read(dl)
        if found is not None and found[0] == replace(lease, expires_at=0.0):
            return
        token = self._owned(lease, found)
        self._swap_or_lost(replace(lease, expires_at=0.0), token, dl)

    @contextmanager
    def hold(self, timeout: float = 30.0) -> Iterator[Lease]:
        """``with lock.hold() as lease:`` acquire, then release even on error."""
        lease = self.acquire(timeout)
        try:
            yield lease
        finally:
            self.release(lease)

    @contextmanager
    def kept(
        self, lease: Lease, *, remaining: Callable[[], float] | None = None
    ) -> Iterator[LeaseKeeper]:
        """Hold ``lease`` while the block runs: renewed in the background every third of the
        ttl (while ``remaining()``, e.g. a deadline's seconds left, is positive), released
        after. Each renewal is bounded by a third of the ttl and the time left, the release
        by the time left (at least ``io_timeout`` without ``remaining``). A renewal or
        release that fails, for any reason (taken over, or the store failing: a connection
        reset, a timeout), is logged as a warning, never raised: the lease only saves wasted
        work and lapses at its expiry, and what the block did (a publish) stands. An
        exception the block raises propagates unchanged."""
        keeper = LeaseKeeper(self, lease, remaining)
        try:
            start_thread(keeper, "keeping a lease")
        except ProcessLimitError:
            self._release_logged(keeper)
            raise
        try:
            yield keeper
        finally:
            keeper.stop()
            self._release_logged(keeper)

    def _release_logged(self, keeper: LeaseKeeper) -> None:
        """Release ``keeper``'s lease, logging a failure: the lease lapses at its expiry.
        The caller waits for it as for any clean-up (engine/cleanup.clean_up): the time
        its work has left, at least GRACE past a deadline that has passed, the rest in the
        background (``io_timeout`` at most). A release made with the spent deadline failed
        at once, and the next holders waited the whole ttl out."""
        lease = keeper.lease

        def release() -> None:
            try:
                self.release(lease, deadline=self.io_timeout)
            except LockError as e:  # lapsed and taken over meanwhile: nothing to give back
                log.warning("lease not released: %s", e)
            except Exception as e:  # the store failed: the lease lapses at its expiry
                log.warning("lease not released: %s: %s", type(e).__name__, e)

        clean_up(release, within=keeper.time_left(self.io_timeout))

    def _owned(self, lease: Lease, found: tuple[Lease, object] | None) -> object:
        """The token of ``found`` if it is ``lease``, still held; LockError otherwise."""
        held = None if found is None else found[0]
        if held is None or (held.owner, held.generation) != (lease.owner, lease.generation):
            raise LockError(f"lease {lease.generation} of {lease.owner} is no longer held")
        if held.expires_at == 0.0:
            raise LockError(f"lease {lease.generation} of {lease.owner} was released")
        return found[1]  # type: ignore[index]

    def _swap_or_lost(self, lease: Lease, token: object, dl: Deadline) -> None:
        try:
            self._swap(lease, token, dl)
        except ConflictError as e:
            raise LockError(f"lease {lease.generation} of {lease.owner} was taken over") from e


class LeaseKeeper(threading.Thread):
    """Renews a lease every third of its ttl until stopped, the time left runs out, or the
    lease is lost (``lost`` then says how). See :meth:`LeaseLock.kept`."""

    def __init__(
        self, lock: LeaseLock, lease: Lease, remaining: Callable[[], float] | None = None
    ) -> None:
        super().__init__(name=f"lease-heartbeat-{lease.generation}", daemon=True)
        self.lock, self.lease = lock, lease
        self.remaining = remaining or (lambda: math.inf)
        self.lost: LockError | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.lock.ttl / 3):
            if self.remaining() <= 0:
                return  # past the deadline the work stops too: let the lease lapse
            try:
                self.lease = self.lock.heartbeat(
                    self.lease, deadline=self.time_left(self.lock.ttl / 3)
                )
            except LockError as e:
                self.lost = e
                log.warning("lease lost while working: %s", e)
                return
            except Exception as e:  # a storage hiccup: the lease has time left, try again
                log.warning("lease renewal failed, will retry: %s: %s", type(e).__name__, e)

    def time_left(self, most: float) -> float:
        """Seconds a call to the store may take now: ``most``, or less if the work's time
        left is shorter (never negative: an exhausted deadline fails the call at once)."""
        return max(0.0, min(most, self.remaining()))

    def stop(self) -> None:
        """Stop renewing, waiting for a renewal in progress; each is bounded by a third of
        the ttl and the time left (a late renewal and the release are both conditional)."""
        self._done.set()
        self.join(timeout=self.time_left(self.lock.ttl / 3) + 0.1)


class ObjectLeaseLock(LeaseLock):
    """A lease stored as one JSON object at ``key`` on ``backend`` (S3: conditional writes)."""

    def __init__(self, backend: Backend, key: str, **options: Any) -> None:
        super().__init__(**options)
        self.backend, self.key = backend, key

    def _read(self, dl: Deadline) -> tuple[Lease, object] | None:
        try:
            got = DeadlineBackend(self.backend, dl).get(self.key)
        except SnapshotNotFoundError:
            return None
        try:
            return _lease(json.loads(got.data)), got.meta.etag
        except (ValueError, TypeError, RecursionError) as e:  # also JSON nested too deeply
            raise LockError(f"lock object {self.key} is malformed") from e

    def _create(self, lease: Lease, dl: Deadline) -> None:
        data = json.dumps(asdict(lease)).encode()
        DeadlineBackend(self.backend, dl).put(self.key, data, mode=PutMode.CREATE)

    def _swap(self, lease: Lease, token: object, dl: Deadline) -> None:
        data = json.dumps(asdict(lease)).encode()
        DeadlineBackend(self.backend, dl).put(self.key, data, mode=PutMode.update(str(token)))


class DynamoDBLeaseLock(LeaseLock):
    """A lease stored as the item ``{"lock_id": lock_id}`` of a DynamoDB table whose
    partition key is ``lock_id`` (string)."""

    def __init__(self, client: Any, table: str, lock_id: str, **options: Any) -> None:
        super().__init__(**options)
        self.client, self.table, self.lock_id = client, table, lock_id

    def _call(self, dl: Deadline, op: str, **kwargs: Any) -> Any:
        call = getattr(self.client, op)
        try:
            return run_within(dl, f"DynamoDB {op}", lambda: call(TableName=self.table, **kwargs))
        except self.client.exceptions.ConditionalCheckFailedException as e:
            raise ConflictError(f"lock {self.lock_id} changed") from e
        except StorageTimeoutError:
            raise
        except Exception as e:
            raise LockError(f"DynamoDB {op} on {self.table}: {type(e).__name__}") from e

    def _item(self, lease: Lease) -> dict[str, Any]:
        # "ttl" lets DynamoDB drop a lock nobody touched for a week (the table's TTL attribute)
        ttl = int(max(lease.expires_at, self._clock())) + 7 * 86400
        return {
            "lock_id": {"S": self.lock_id},
            "ttl": {"N": str(ttl)},
            "owner": {"S": lease.owner},
            "generation": {"N": str(lease.generation)},
            "expires_at": {"N": repr(lease.expires_at)},
        }

    def _read(self, dl: Deadline) -> tuple[Lease, object] | None:
        item = self._call(dl, "get_item", Key={"lock_id": {"S": self.lock_id}}, ConsistentRead=True)
        if "Item" not in item:
            return None
        i = item["Item"]
        try:
            lease = Lease(i["owner"]["S"], int(i["generation"]["N"]), float(i["expires_at"]["N"]))
        except (KeyError, TypeError, ValueError) as e:  # an item written by something else
            raise LockError(f"lock item {self.lock_id} in {self.table} is malformed") from e
        return lease, lease

    def _create(self, lease: Lease, dl: Deadline) -> None:
        self._call(
            dl,
            "put_item",
            Item=self._item(lease),
            ConditionExpression="attribute_not_exists(lock_id)",
        )

    def _swap(self, lease: Lease, token: object, dl: Deadline) -> None:
        assert isinstance(token, Lease)
        self._call(
            dl,
            "put_item",
            Item=self._item(lease),
            ConditionExpression="#o = :o AND generation = :g AND expires_at = :e",
            ExpressionAttributeNames={"#o": "owner"},
            ExpressionAttributeValues={
                ":o": {"S": token.owner},
                ":g": {"N": str(token.generation)},
                ":e": {"N": repr(token.expires_at)},
            },
        )
