"""The compactor handler with real chroma: deltas chroma refuses fail alone, and the lease is
renewed while a compaction works and never turns a published batch into a failure."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from chroma_helpers import build

from chroma_snapshots import RemoteStore
from chroma_snapshots import chroma as chroma_module
from chroma_snapshots.aws_lambda.compactor import CompactionHandler
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.chroma import open_client, publish_client
from chroma_snapshots.compaction import Delta, Record, applied_ids, compact
from chroma_snapshots.compaction import deltas as deltas_module
from chroma_snapshots.compaction import merge as compaction_module
from chroma_snapshots.config import LambdaConfig
from chroma_snapshots.engine.cleanup import clean_up
from chroma_snapshots.engine.deadline import Deadline, DeadlineLike
from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConflictError,
    LockError,
    StorageTimeoutError,
)
from chroma_snapshots.locking import Lease, ObjectLeaseLock
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.lambda_context import FakeContext

DIM = 8


def sqs_event(*bodies: Any) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"m{i}",
                "receiptHandle": f"rh{i}",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1"},
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:deltas",
            }
            for i, body in enumerate(bodies)
        ]
    }


def failures(response: dict[str, Any]) -> set[str]:
    return {f["itemIdentifier"] for f in response["batchItemFailures"]}


def good(name: str, n: int = 2) -> dict[str, Any]:
    return {
        "id": name,
        "collection": "receipts",
        "upserts": [
            {"id": f"{name}-r{k}", "embedding": [0.1 * k] * DIM, "document": f"{name} {k}"}
            for k in range(n)
        ],
    }


def record(rid: str, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "embedding": [0.5] * DIM, **extra}


# Deltas that pass a JSON-shape check but that chroma refuses, one of each kind.
BAD = {
    "short-name": {"id": "bad-1", "collection": "ab", "upserts": [record("b1")]},
    "document-object": {
        "id": "bad-2",
        "collection": "receipts",
        "upserts": [record("b2", document={"text": "x"})],
    },
    "nested-metadata": {
        "id": "bad-3",
        "collection": "receipts",
        "upserts": [record("b3", metadata={"price": {"amount": 3}})],
    },
    "duplicate-ids": {"id": "bad-4", "collection": "receipts", "upserts": [record("b4")] * 2},
    "wrong-dimension": {
        "id": "bad-5",
        "collection": "receipts",
        "upserts": [{"id": "b5", "embedding": [0.5] * (DIM + 1)}],
    },
    "reserved-metadata-key": {
        "id": "bad-6",
        "collection": "receipts",
        "upserts": [record("b6", metadata={"$where": 1})],
    },
}


@pytest.fixture
def store(moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> RemoteStore:
    backend = S3Backend(
        s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url)
    )
    remote = RemoteStore(backend)
    publish_client(remote, "db", build(tmp_path / "seed", {"receipts": 20}, dim=DIM))
    return remote


@pytest.fixture
def config(moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> LambdaConfig:
    return LambdaConfig.from_env(
        {
            "CHROMA_SNAPSHOTS_URL": f"s3://{s3_bucket}/snaps",
            "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url,
            "CHROMA_SNAPSHOTS_NAME": "db",
            "CHROMA_SNAPSHOTS_CACHE_DIR": str(tmp_path / "cache"),
            "CHROMA_SNAPSHOTS_RESERVE_SECONDS": "1",
        }
    )


def landed(store: RemoteStore) -> set[str]:
    with open_client(store, "db") as client:
        return set(client.get_collection("receipts").get(include=[])["ids"])


def test_each_refused_delta_fails_alone_and_good_deltas_land(
    store: RemoteStore, config: LambdaConfig
) -> None:
    handler = CompactionHandler(config, store=store)
    for n, (kind, bad) in enumerate(BAD.items()):
        event = sqs_event(good(f"g{n}a"), bad, good(f"g{n}b"))
        assert failures(handler(event, FakeContext(120))) == {"m1"}, kind
    ids = landed(store)
    for n in range(len(BAD)):
        assert {f"g{n}a-r0", f"g{n}a-r1", f"g{n}b-r0", f"g{n}b-r1"} <= ids
    assert not {f"b{k}" for k in range(1, 7)} & ids
    assert len(ids) == 20 + 4 * len(BAD)
    assert set(applied_ids(store.resolve("db"))) == {
        f"g{n}{x}" for n in range(len(BAD)) for x in "ab"
    }


def test_chroma_refusals_the_checks_miss_are_isolated(
    store: RemoteStore, config: LambdaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the up-front checks switched off, chroma itself refuses the bad deltas: each is
    set aside and the batch is applied again without it, so only the bad ones fail."""
    monkeypatch.setattr(deltas_module, "problem", lambda delta: None)
    monkeypatch.setattr(compaction_module, "problem", lambda delta: None)
    monkeypatch.setattr(compaction_module, "dimension_problem", lambda delta, dim: None)
    handler = CompactionHandler(config, store=store)
    kinds = ["short-name", "duplicate-ids", "wrong-dimension", "reserved-metadata-key"]
    event = sqs_event(good("g0"), *[BAD[k] for k in kinds], good("g1"), good("g2"))
    assert failures(handler(event, FakeContext(300))) == {"m1", "m2", "m3", "m4"}
    ids = landed(store)
    assert {"g0-r0", "g1-r1", "g2-r0"} <= ids
    assert not {"b1", "b4", "b5", "b6"} & ids
    assert set(applied_ids(store.resolve("db"))) == {"g0", "g1", "g2"}


def test_a_delta_delivered_twice_in_one_batch_is_applied_once(
    store: RemoteStore, config: LambdaConfig
) -> None:
    handler = CompactionHandler(config, store=store)
    twice = good("twice")
    assert failures(handler(sqs_event(twice, good("other"), twice), FakeContext(120))) == set()
    assert applied_ids(store.resolve("db")) == ["twice", "other"]


def test_compact_reports_rejected_deltas(store: RemoteStore) -> None:
    ok = Delta("ok", "receipts", (Record("ok-r0", (1.0,) * DIM),))
    wrong_dim = Delta("wrong", "receipts", (Record("w-r0", (1.0, 2.0)),))
    new_collection = Delta("new", "fresh-collection", (Record("n-r0", (1.0, 2.0, 3.0)),))
    clash = Delta("clash", "fresh-collection", (Record("c-r0", (1.0,)),))  # 3 set by "new"
    result = compact(store, "db", [ok, wrong_dim, new_collection, clash])
    assert result.applied == ("ok", "new")
    assert set(result.rejected) == {"wrong", "clash"}
    assert "dimension 8" in result.rejected["wrong"]
    assert result.base is not None
    assert result.info is not None


# The lease: ttl 1 s against a 2.5 s publish.

TTL, PUBLISH_SECONDS = 1.0, 2.5


@pytest.fixture
def slow_publish(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """compaction's publish takes 2.5 s; the event is set while one is under way."""
    real, publishing = chroma_module.publish_client, threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        publishing.set()
        try:
            time.sleep(PUBLISH_SECONDS)
            return real(*args, **kwargs)
        finally:
            publishing.clear()

    monkeypatch.setattr(compaction_module, "publish_client", slow)
    return publishing


def lease_lock(store: RemoteStore, owner: str) -> ObjectLeaseLock:
    return ObjectLeaseLock(store.backend, "locks/db", ttl=TTL, owner=owner, poll=0.05)


class NoHeartbeat(ObjectLeaseLock):
    """A lock whose renewals are refused (as when the store cannot be reached)."""

    def heartbeat(self, lease: Lease, *, deadline: DeadlineLike = None) -> Lease:
        raise LockError("renewal refused (test)")


def rival_during(
    publishing: threading.Event, lock: ObjectLeaseLock
) -> tuple[Callable[[], None], list[Lease]]:
    """A rival that tries to take the lock all through the publish; returns join and its wins."""
    won: list[Lease] = []
    stop = threading.Event()

    def run() -> None:
        publishing.wait(60)
        while publishing.is_set() and not stop.is_set():
            try:
                won.append(lock.acquire(timeout=0))
                return  # holds it (never releases): the compactor's lease was taken over
            except LockError:
                time.sleep(0.1)

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join() -> None:
        stop.set()
        t.join(30)

    return join, won


def test_lease_is_renewed_while_publishing(
    store: RemoteStore, config: LambdaConfig, slow_publish: threading.Event
) -> None:
    handler = CompactionHandler(config, store=store, lock=lease_lock(store, "compactor"))
    join, won = rival_during(slow_publish, lease_lock(store, "rival"))
    response = handler(sqs_event(good("slow")), FakeContext(60))
    join()
    assert failures(response) == set()
    assert won == []  # renewed every third of the ttl: never expired, never taken over
    assert "slow" in applied_ids(store.resolve("db"))
    lease_lock(store, "next").acquire(timeout=0)  # and released after the publish


def test_lost_lease_after_publish_is_a_warning_not_a_failure(
    store: RemoteStore,
    config: LambdaConfig,
    slow_publish: threading.Event,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lock = NoHeartbeat(store.backend, "locks/db", ttl=TTL, owner="compactor", poll=0.05)
    handler = CompactionHandler(config, store=store, lock=lock)
    join, won = rival_during(slow_publish, lease_lock(store, "rival"))
    with caplog.at_level(logging.WARNING, logger="chroma_snapshots"):
        response = handler(sqs_event(good("published")), FakeContext(60))
    join()
    assert len(won) == 1  # the lease lapsed during the publish and the rival took it
    assert failures(response) == set()  # the delta was published: no redelivery
    assert "published" in applied_ids(store.resolve("db"))
    assert any("not released" in r.getMessage() for r in caplog.records)


def test_lost_lease_does_not_end_the_conflict_retries(
    store: RemoteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt loses its lease during a slow publish that then loses the CAS race:
    the failed release must not escape; the second attempt waits for the rival's lease to
    lapse, takes it over and publishes."""
    real, calls, publishing = chroma_module.publish_client, [], threading.Event()

    def first_loses(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            publishing.set()
            time.sleep(PUBLISH_SECONDS)
            publishing.clear()
            raise ConflictError("another compactor published first (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(compaction_module, "publish_client", first_loses)
    join, won = rival_during(publishing, lease_lock(store, "rival"))
    lock = NoHeartbeat(store.backend, "locks/db", ttl=TTL, owner="compactor", poll=0.05)
    result = compact(
        store, "db", [Delta("retried", "receipts", (Record("x", (1.0,) * DIM),))], lock=lock
    )
    join()
    assert len(won) == 1
    assert result.attempts == 2
    assert len(result.conflicts) == 1
    assert result.fence is not None
    assert result.fence > won[0].generation
    assert "retried" in applied_ids(store.resolve("db"))


# Findings of the review: one delta's unexpected failure, a refused creator of a collection,
# a release that fails after the publish, and a delta id reused with other content.


def test_a_delta_id_that_is_not_utf8_fails_alone(store: RemoteStore, config: LambdaConfig) -> None:
    """A lone surrogate in the delta id (valid JSON, "\\ud800") would fail the manifest's
    encoding at publish, and with it every delta of the batch."""
    handler = CompactionHandler(config, store=store)
    evil = {**good("evil"), "id": "evil-\ud800"}
    assert failures(handler(sqs_event(good("g0"), evil, good("g1")), FakeContext(120))) == {"m1"}
    assert {"g0-r0", "g1-r1"} <= landed(store)
    assert applied_ids(store.resolve("db")) == ["g0", "g1"]


def test_a_delta_id_too_long_for_the_manifest_fails_alone(
    store: RemoteStore, config: LambdaConfig
) -> None:
    """Ids of 240 KB were accepted, and once 60 were recorded the manifest passed readers'
    16 MiB header limit: every later batch failed, its good deltas reported as poison."""
    handler = CompactionHandler(config, store=store)
    long = {**good("long"), "id": "x" * 513}
    fits = {**good("fits"), "id": "y" * 512}
    event = sqs_event(good("g0"), long, fits)
    assert failures(handler(event, FakeContext(120))) == {"m1"}
    assert applied_ids(store.resolve("db")) == ["g0", "y" * 512]


def test_anything_raised_while_applying_a_delta_isolates_that_delta(
    store: RemoteStore, config: LambdaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = compaction_module._apply_one

    def apply_one(client: Any, delta: Delta, check: Callable[[], None]) -> None:
        if delta.id == "boom":
            raise RuntimeError("unexpected (test)")
        real(client, delta, check)

    monkeypatch.setattr(compaction_module, "_apply_one", apply_one)
    handler = CompactionHandler(config, store=store)
    event = sqs_event(good("g0"), good("boom"), good("g1"))
    assert failures(handler(event, FakeContext(120))) == {"m1"}
    assert applied_ids(store.resolve("db")) == ["g0", "g1"]


def fresh(name: str, dim: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": name,
        "collection": "fresh",
        "upserts": [{"id": f"{name}-r", "embedding": [0.5] * dim, **extra}],
    }


POISON_CREATOR = fresh("poison", 3, metadata={"tags": [float("nan")]})


def test_a_refused_creator_does_not_set_a_new_collections_dimension(
    store: RemoteStore, config: LambdaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first delta to create a collection is refused by chroma itself (the up-front
    checks switched off): the dimension is the first applied delta's, so the good delta
    of another dimension lands."""
    monkeypatch.setattr(deltas_module, "problem", lambda delta: None)
    monkeypatch.setattr(compaction_module, "problem", lambda delta: None)
    handler = CompactionHandler(config, store=store)
    event = sqs_event(POISON_CREATOR, fresh("legit", 5), fresh("clash", 3), good("g0"))
    assert failures(handler(event, FakeContext(120))) == {"m0", "m2"}
    assert applied_ids(store.resolve("db")) == ["legit", "g0"]
    with open_client(store, "db") as client:
        assert client.get_collection("fresh").get(include=[])["ids"] == ["legit-r"]


def test_a_poison_creator_does_not_block_a_good_one(
    store: RemoteStore, config: LambdaConfig
) -> None:
    handler = CompactionHandler(config, store=store)
    response = handler(sqs_event(POISON_CREATOR, fresh("legit", 5)), FakeContext(120))
    assert failures(response) == {"m0"}
    assert applied_ids(store.resolve("db")) == ["legit"]


class FailingRelease(ObjectLeaseLock):
    """A lock whose release fails after the publish (a proxy resetting the connection)."""

    error: Exception = BackendUnavailableError("connection reset (test)")

    def release(self, lease: Lease, *, deadline: DeadlineLike = None) -> None:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [BackendUnavailableError("reset (test)"), ConnectionResetError(104, "reset"), RuntimeError()],
    ids=lambda e: type(e).__name__,
)
def test_a_failed_release_after_the_publish_is_a_warning_not_a_failure(
    store: RemoteStore,
    config: LambdaConfig,
    error: Exception,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lock = FailingRelease(store.backend, "locks/db", ttl=30, owner="compactor", poll=0.05)
    lock.error = error
    handler = CompactionHandler(config, store=store, lock=lock)
    with caplog.at_level(logging.WARNING, logger="chroma_snapshots"):
        response = handler(sqs_event(good("p0"), good("p1")), FakeContext(60))
    assert failures(response) == set()  # both were published: no redelivery
    assert applied_ids(store.resolve("db")) == ["p0", "p1"]
    assert any("not released" in r.getMessage() for r in caplog.records)


def test_a_reused_delta_id_with_other_content_is_a_warning(
    store: RemoteStore, config: LambdaConfig, caplog: pytest.LogCaptureFixture
) -> None:
    handler = CompactionHandler(config, store=store)
    other = {**good("other"), "id": "reused"}
    event = sqs_event(good("reused"), good("reused"), other)
    with caplog.at_level(logging.WARNING, logger="chroma_snapshots"):
        assert failures(handler(event, FakeContext(120))) == set()  # idempotency as before
    warned = [r.getMessage() for r in caplog.records if "different content" in r.getMessage()]
    assert len(warned) == 1  # the identical redelivery is not warned about
    assert "'reused'" in warned[0]
    assert applied_ids(store.resolve("db")) == ["reused"]
    assert "other-r0" not in landed(store)


@pytest.mark.parametrize("where", ["between deltas", "within a delta"])
def test_a_compaction_stops_applying_at_its_deadline(
    store: RemoteStore, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """No call to chroma can be interrupted, so the deadline is looked at before each: a
    batch of large deltas ran 16 s past a 4 s budget, every upsert made after it."""
    monkeypatch.setattr(compaction_module, "CALL_RECORDS", 10)
    deadline = Deadline(120)
    calls: list[int] = []
    real = compaction_module._apply_one

    def apply_one(client: Any, delta: Delta, check: Callable[[], None]) -> None:
        col = client.get_or_create_collection(delta.collection, embedding_function=None)
        upsert = col.upsert

        def counted(**kw: Any) -> None:
            calls.append(len(kw["ids"]))
            upsert(**kw)
            deadline.call_off()  # the time runs out during this call

        monkeypatch.setattr(type(col), "upsert", lambda self, **kw: counted(**kw))
        real(client, delta, check)

    monkeypatch.setattr(compaction_module, "_apply_one", apply_one)
    n = 2 if where == "between deltas" else 30  # 30 upserts: three calls of 10
    deltas = [Delta.from_obj(good("d0", n)), Delta.from_obj(good("d1", n))]
    with pytest.raises(StorageTimeoutError, match="applying the deltas"):
        compact(store, "db", deltas, deadline=deadline)
    assert calls == [n if n <= 10 else 10]  # the one call made before the time ran out
    assert applied_ids(store.resolve("db")) == []  # nothing published


def test_the_handler_returns_once_the_clean_ups_left_running_are_done(
    store: RemoteStore, config: LambdaConfig
) -> None:
    """Lambda freezes the process when the handler returns: a lease's release handed to
    the background after the deadline never ran, and the next compactors waited out the
    ttl. The handler waits for such work within the invocation's time."""
    done = threading.Event()

    def slow_release() -> None:
        time.sleep(0.6)  # past GRACE; well within the handler's reserve (1 s here)
        done.set()

    handler = CompactionHandler(config, store=store)
    clean_up(slow_release, within=0.0)  # waited for GRACE, then left to the background
    assert not done.is_set()
    # a poison message: no compaction, the batch itself is done in milliseconds
    assert failures(handler(sqs_event({"not": "a delta"}), FakeContext(120))) == {"m0"}
    assert done.is_set()


def test_only_deltas_sharing_an_id_are_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison reads every record, before any deadline check: a batch of 10,000
    records of 384 floats spent 9.7 s in it, every delta compared though none shared an id."""
    compared: list[str] = []
    real = compaction_module._content

    def content(d: Delta) -> str:
        compared.append(d.id)
        return real(d)

    monkeypatch.setattr(compaction_module, "_content", content)
    deltas = [Delta.from_obj(good(n)) for n in ("a", "b", "c")] + [Delta.from_obj(good("a", 3))]
    compaction_module._warn_same_id(deltas)
    assert compared == ["a", "a"]
