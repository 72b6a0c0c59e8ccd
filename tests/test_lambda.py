"""The bundled Lambda handlers against moto's HTTP server and a real chroma snapshot."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import lambda_plugins
import pytest
from chroma_helpers import build, close_client

from chroma_snapshots import RemoteStore
from chroma_snapshots.aws_lambda.common import load_callable
from chroma_snapshots.aws_lambda.compactor import CompactionHandler
from chroma_snapshots.aws_lambda.query import QueryHandler, default_query
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.chroma import open_client, publish_client
from chroma_snapshots.config import LambdaConfig
from chroma_snapshots.errors import ConfigError, InvalidInputError
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.lambda_context import FakeContext
from chroma_snapshots.testing.proxy import CountingProxy

DIM = 8


def sqs_event(*bodies: Any) -> dict[str, Any]:
    recs = []
    for i, body in enumerate(bodies):
        raw = body if isinstance(body, str) else json.dumps(body)
        recs.append(
            {
                "messageId": f"m{i}",
                "receiptHandle": f"rh{i}",
                "body": raw,
                "attributes": {"ApproximateReceiveCount": "1"},
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:queries",
            }
        )
    return {"Records": recs}


def failures(response: dict[str, Any]) -> set[str]:
    return {f["itemIdentifier"] for f in response["batchItemFailures"]}


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[CountingProxy]:
    with CountingProxy(moto_server.endpoint_url) as p:
        yield p


@pytest.fixture(autouse=True)
def _fresh_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink plug-in's results, empty for each test (no test sees another's)."""
    monkeypatch.setattr(lambda_plugins, "RESULTS", {})


@pytest.fixture
def env(proxy: CountingProxy, s3_bucket: str, tmp_path: Path) -> dict[str, str]:
    store = RemoteStore(S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=proxy.url)))
    publish_client(store, "db", build(tmp_path / "db", {"receipts": 200}, dim=DIM))
    return {
        "CHROMA_SNAPSHOTS_URL": f"s3://{s3_bucket}/snaps",
        "AWS_ENDPOINT_URL_S3": proxy.url,
        "CHROMA_SNAPSHOTS_NAME": "db",
        "CHROMA_SNAPSHOTS_CACHE_DIR": str(tmp_path / "cache"),
        "CHROMA_SNAPSHOTS_SINK": "lambda_plugins:collect",
        "CHROMA_SNAPSHOTS_RESERVE_SECONDS": "1",
    }


def test_only_bad_messages_fail(env: dict[str, str]) -> None:
    handler = QueryHandler(LambdaConfig.from_env(env))
    event = sqs_event(
        {"collection": "receipts", "query_embeddings": [[0.5] * DIM], "n_results": 3},
        "{not json",
        {"query_embeddings": [[0.5] * DIM]},  # no collection
        {"collection": "receipts", "ids": ["receipts-7"], "n_results": 1},
        {"collection": "no-such-collection", "query_embeddings": [[0.5] * DIM]},
        {"collection": "receipts", "query_embeddings": [[0.5] * DIM], "n_results": 0},
    )
    response = handler(event, FakeContext(30))
    assert failures(response) == {"m1", "m2", "m4", "m5"}
    assert set(lambda_plugins.RESULTS) == {"m0", "m3"}
    assert len(lambda_plugins.RESULTS["m0"]["ids"][0]) == 3
    assert lambda_plugins.RESULTS["m3"]["ids"][0] == ["receipts-7"]  # nearest to itself


def test_near_the_deadline_nothing_is_dropped(env: dict[str, str]) -> None:
    handler = QueryHandler(
        LambdaConfig.from_env({**env, "CHROMA_SNAPSHOTS_PROCESSOR": "lambda_plugins:slow_query"})
    )
    query = {"collection": "receipts", "query_embeddings": [[0.1] * DIM]}
    handler(sqs_event(query), FakeContext(30))  # warm the cache first
    lambda_plugins.RESULTS.clear()
    t = time.monotonic()
    response = handler(sqs_event(*[query] * 8), FakeContext(2.5))  # 1.5 s of work after the reserve
    assert time.monotonic() - t < 2.5
    done, failed = set(lambda_plugins.RESULTS), failures(response)
    assert done  # some processed...
    assert failed  # ...the rest reported for a retry
    assert done | failed == {f"m{i}" for i in range(8)}
    assert not done & failed


def test_second_invocation_is_warm(env: dict[str, str], proxy: CountingProxy) -> None:
    handler = QueryHandler(LambdaConfig.from_env(env))
    event = sqs_event({"collection": "receipts", "query_embeddings": [[0.5] * DIM]})
    assert failures(handler(event, FakeContext(30))) == set()
    proxy.reset()
    assert failures(handler(event, FakeContext(30))) == set()
    seen = proxy.reset()
    assert len(seen) <= 1
    assert not [r for r in seen if "/packs/" in r.path or "/manifests/" in r.path]


def test_compaction_handler(env: dict[str, str]) -> None:
    handler = CompactionHandler(LambdaConfig.from_env(env))
    delta = {
        "id": "batch-1",
        "collection": "receipts",
        "upserts": [{"id": "new-1", "embedding": [0.5] * DIM, "document": "new"}],
        "deletes": ["receipts-0"],
    }
    event = sqs_event(
        delta, {"id": "batch-2", "collection": "receipts", "upserts": [{"id": "x"}]}, "[]"
    )
    assert failures(handler(event, FakeContext(60))) == {"m1", "m2"}
    with open_client(handler.store, "db") as client:
        col = client.get_collection("receipts")
        assert col.count() == 200
        assert col.get(ids=["new-1", "receipts-0"])["ids"] == ["new-1"]
    version = handler.store.resolve("db").version
    assert failures(handler(sqs_event(delta), FakeContext(60))) == set()  # redelivery: no-op
    assert handler.store.resolve("db").version == version


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"CHROMA_SNAPSHOTS_NAME": ""}, "CHROMA_SNAPSHOTS_NAME"),
        ({"CHROMA_SNAPSHOTS_PROCESSOR": "no_such_module:fn"}, "CHROMA_SNAPSHOTS_PROCESSOR="),
        ({"CHROMADB_STORAGE_MODE": "auto", "CHROMA_SNAPSHOTS_URL": ""}, "CHROMA_ROOT"),
    ],
)
def test_bad_configuration_fails_the_cold_start(
    env: dict[str, str], extra: dict[str, str], needle: str
) -> None:
    bad = {**os.environ, **env, **extra}
    out = subprocess.run(
        [sys.executable, "-c", "import chroma_snapshots.aws_lambda.query as q; q.handler"],
        env=bad,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "ConfigError" in out.stderr
    assert needle in out.stderr


def test_auto_mode_serves_from_s3_when_efs_hangs(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    from chroma_snapshots.testing.faultfs import FaultyMount

    if not os.path.exists("/dev/fuse"):
        if os.environ.get("CI"):
            pytest.fail("FUSE is required in CI")
        pytest.skip("no FUSE on this machine")
    (tmp_path / "backing").mkdir()
    with FaultyMount(tmp_path / "backing", tmp_path / "mnt", state_dir=tmp_path) as mnt:
        env = {
            "CHROMADB_STORAGE_MODE": "auto",
            "CHROMA_ROOT": str(mnt.mountpoint),
            "CHROMADB_BUCKET": s3_bucket,
            "CHROMA_SNAPSHOTS_MIRROR": "true",
            "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url,
            "CHROMA_SNAPSHOTS_EFS_TIMEOUT": "2",
            "CHROMA_SNAPSHOTS_NAME": "db",
            "CHROMA_SNAPSHOTS_CACHE_DIR": str(tmp_path / "cache"),
            "CHROMA_SNAPSHOTS_SINK": "lambda_plugins:collect",
        }
        handler = QueryHandler(LambdaConfig.from_env(env))
        publish_client(handler.store, "db", build(tmp_path / "db", {"receipts": 50}, dim=DIM))
        records: list[logging.LogRecord] = []

        class Capture(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        capture = Capture()
        logging.getLogger("chroma_snapshots.aws_lambda").addHandler(capture)
        mnt.set_mode("hang")
        t = time.monotonic()
        response = handler(
            sqs_event({"collection": "receipts", "query_embeddings": [[0.5] * DIM]}),
            FakeContext(15),
        )
        assert time.monotonic() - t < 14
        assert failures(response) == set()
        summary = [r for r in records if getattr(r, "source", None)]
        assert summary[-1].source == f"s3://{s3_bucket} at {moto_server.endpoint_url}"  # type: ignore[attr-defined]
        logging.getLogger("chroma_snapshots.aws_lambda").removeHandler(capture)


def test_embedded_metric_format(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    handler = QueryHandler(
        LambdaConfig.from_env({**env, "CHROMA_SNAPSHOTS_METRICS_NAMESPACE": "Chroma"})
    )
    handler(
        sqs_event({"collection": "receipts", "query_embeddings": [[0.5] * DIM]}, "oops"),
        FakeContext(30),
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    emf = [x for x in lines if "_aws" in x]
    assert len(emf) == 1
    assert emf[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Chroma"
    assert (emf[0]["Processed"], emf[0]["Failed"], emf[0]["Snapshot"]) == (1, 1, "db")


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("", None),  # ":x": ValueError (empty module name) from importlib
        ("../etc", None),  # TypeError from importlib (a relative import)
        ("plugin_raises", "raise RuntimeError('broken at import')\n"),
        ("plugin_syntax", "def fn(:\n"),
        ("plugin_exits", "import sys\nsys.exit(3)\n"),
    ],
)
def test_a_plug_in_that_cannot_be_imported_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str | None
) -> None:
    if source is not None:
        module = f"{module}_{uuid.uuid4().hex[:8]}"  # never one already imported
        (tmp_path / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("CHROMA_SNAPSHOTS_PROCESSOR", "CHROMA_SNAPSHOTS_SINK"):
        with pytest.raises(ConfigError, match=var) as raised:
            load_callable(f"{module}:fn", var)
        if source is not None:
            assert raised.value.__cause__ is not None  # the import's own error, chained


@pytest.mark.parametrize("spec", [":x", "mod:", " : "])
def test_a_plug_in_spec_without_both_parts_fails_the_configuration(
    env: dict[str, str], spec: str
) -> None:
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_SINK"):
        LambdaConfig.from_env({**env, "CHROMA_SNAPSHOTS_SINK": spec})


def test_an_init_budget_above_lambdas_limit_is_a_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"CHROMA_SNAPSHOTS_INIT_SECONDS='11'.*10 s"):
        LambdaConfig.from_env({**env, "CHROMA_SNAPSHOTS_INIT_SECONDS": "11"})
    assert LambdaConfig.from_env({**env, "CHROMA_SNAPSHOTS_INIT_SECONDS": "10"}).init_seconds == 10


@pytest.mark.parametrize(
    ("vector", "where"),
    [
        ([10**309] + [0.5] * (DIM - 1), "query_embeddings[0][0]"),  # 1e309 as an integer
        ([0.5, 1e39] + [0.5] * (DIM - 2), "query_embeddings[0][1]"),  # beyond a 32-bit float
        ([0.5] * (DIM - 1) + ["1"], "query_embeddings[0][7]"),
    ],
)
def test_query_embeddings_that_are_not_numbers_are_invalid_input(
    tmp_path: Path, vector: list[Any], where: str
) -> None:
    client = build(tmp_path / "db", {"receipts": 5}, dim=DIM)
    try:
        body = {"collection": "receipts", "query_embeddings": [vector]}
        with pytest.raises(InvalidInputError, match=re.escape(where)):
            default_query(client, body)
        ok = default_query(client, {**body, "query_embeddings": [[0.5] * DIM], "n_results": 1})
        assert len(ok["ids"][0]) == 1
    finally:
        close_client(client)


def test_releasing_unprocessed_messages_ends_before_the_invocation_does() -> None:
    # An SQS endpoint that hangs: the releases are abandoned when the invocation has a
    # second left, so batchItemFailures still reaches Lambda (else the whole batch returns).
    from chroma_snapshots.aws_lambda.batch import BatchOutcome, Message
    from chroma_snapshots.aws_lambda.common import finish

    class HungSqs:
        def get_queue_url(self, **kw: Any) -> dict[str, str]:
            time.sleep(30)
            return {"QueueUrl": "never"}

    arn = "arn:aws:sqs:us-east-1:123456789012:q"
    left = [Message(f"m{i}", {}, f"r{i}", arn, 1) for i in range(5)]
    config = LambdaConfig.from_env({"CHROMA_SNAPSHOTS_URL": "memory://x",
                                    "CHROMA_SNAPSHOTS_NAME": "db",
                                    "CHROMA_SNAPSHOTS_RELEASE_UNPROCESSED": "true"})  # fmt: skip
    context = FakeContext(2.5)
    response = finish(config, BatchOutcome(unprocessed=left), context, "query", {}, HungSqs)
    assert context.get_remaining_time_in_millis() > 0  # answered while it could still be
    assert [f["itemIdentifier"] for f in response["batchItemFailures"]] == [
        m.message_id for m in left
    ]


def test_hand_made_event_shapes_fail_alone_never_the_batch(env: dict[str, str]) -> None:
    """``Records`` that is not a list is no records; a body that is not text (a dict, as
    a hand-built test event has it) and attributes of the wrong type fail their message
    alone. Both raised a raw TypeError before, losing the good messages' answers."""
    handler = QueryHandler(LambdaConfig.from_env(env))
    for empty in ({"Records": None}, {"Records": "x"}, {"Records": {"a": 1}}):
        assert handler(empty, FakeContext(30)) == {"batchItemFailures": []}
    event = sqs_event({"collection": "receipts", "ids": ["receipts-7"], "n_results": 1})
    good = event["Records"][0]
    bad_body = {**good, "messageId": "m-dict", "body": {"collection": "receipts"}}
    odd_attrs = {**good, "messageId": "m-attrs", "attributes": ["not", "a", "dict"]}
    event["Records"] += [bad_body, odd_attrs]
    response = handler(event, FakeContext(30))
    assert failures(response) == {"m-dict"}
    assert set(lambda_plugins.RESULTS) == {"m0", "m-attrs"}


@pytest.mark.parametrize(
    "key", ["../../x", "db/refs/latest", "db/manifests", "db", "_probes/x", ".locks/x", "a//b"]
)
def test_a_lock_key_the_store_cannot_hold_fails_the_cold_start(
    env: dict[str, str], key: str
) -> None:
    """A lock key that is no canonical key, or one among the snapshot's own objects (its
    refs: the lock read `latest` as a malformed lease), failed every message at run time,
    sending the whole queue to the dead-letter queue; now the configuration is refused."""
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_LOCK_KEY"):
        LambdaConfig.from_env({**env, "CHROMA_SNAPSHOTS_LOCK_KEY": key})
    for fine in ("locks/compactor", "db/locks/publish"):
        cfg = LambdaConfig.from_env({**env, "CHROMA_SNAPSHOTS_LOCK_KEY": fine})
        assert cfg.lock_key == fine


def test_odd_receive_counts_and_contexts_never_fail_the_batch(env: dict[str, str]) -> None:
    """A receive count of "²" (str.isdigit says yes, int() says no) or of 5,000 digits (past
    int()'s limit) counts as a first delivery; a context of None (a call by hand), one
    claiming 1e12 s left or one whose clock raises is Lambda's longest invocation. Each
    raised from the handler before, losing the good messages' answers."""
    handler = QueryHandler(LambdaConfig.from_env(env))
    event = sqs_event({"collection": "receipts", "ids": ["receipts-7"], "n_results": 1})
    good = event["Records"][0]
    for i, count in enumerate(["²", "9" * 5000, "-1", " 1", True, 10**5000]):
        odd = {**good, "messageId": f"m-count{i}", "attributes": {"ApproximateReceiveCount": count}}
        event["Records"].append(odd)
    response = handler(event, FakeContext(30))
    assert failures(response) == set()
    assert set(lambda_plugins.RESULTS) == {"m0"} | {f"m-count{i}" for i in range(6)}

    class Forever:
        def get_remaining_time_in_millis(self) -> float:
            return 1e15

    class Broken:
        def get_remaining_time_in_millis(self) -> float:
            raise RuntimeError("no clock here")

        @property
        def aws_request_id(self) -> str:
            raise KeyError("no id either")

    for context in (None, Forever(), object(), Broken()):
        lambda_plugins.RESULTS.clear()
        response = handler(sqs_event(json.loads(good["body"])), cast(Any, context))
        assert failures(response) == set()
        assert set(lambda_plugins.RESULTS) == {"m0"}


@pytest.mark.parametrize("key", ["query_embeddings", "ids"])
def test_a_message_asking_for_too_many_results_fails_alone_before_chroma_runs(
    tmp_path: Path, key: str
) -> None:
    """2,000 queries of n_results=1,000 in one small message took 1.4 GiB before chroma
    refused it (a 1 GiB Lambda is killed, and the rest of its batch with it)."""
    client = build(tmp_path / "db", {"receipts": 5}, dim=DIM)
    try:
        many = [[0.5] * DIM] * 2000 if key == "query_embeddings" else ids(2000)
        body = {"collection": "receipts", key: many, "n_results": 1000}
        with pytest.raises(InvalidInputError, match="ask for 2000000 results; a message may"):
            default_query(client, body)
        fits = {**body, key: many[:10], "n_results": 100}  # 1,000 results: allowed
        found = 10 if key == "query_embeddings" else 5  # of receipts-0 .. -9, 5 exist
        assert len(default_query(client, fits)["ids"]) == found
    finally:
        close_client(client)


def test_an_answer_carries_what_chroma_gives_in_the_same_shape(tmp_path: Path) -> None:
    """Documents and metadata are read after the query, in pages: the same answer."""
    client = build(tmp_path / "db", {"receipts": 300}, dim=DIM)
    try:
        probes = [[0.5] * DIM, [0.1] * DIM, [0.9] * DIM]
        body = {"collection": "receipts", "query_embeddings": probes, "n_results": 150}
        got = default_query(client, body)
        include: Any = ["documents", "metadatas", "distances"]
        want = client.get_collection("receipts").query(
            query_embeddings=probes, n_results=150, include=include
        )
        for key in ("ids", "distances", "documents", "metadatas"):
            assert got[key] == want[key], key
        assert len({i for q in got["ids"] for i in q}) > 150  # more than one page, overlaps
    finally:
        close_client(client)


def test_an_answer_too_large_to_return_fails_alone_before_it_is_built(tmp_path: Path) -> None:
    """1,000 results of 100 KB documents took a reader to 697 MiB: the documents and
    metadata are read in pages and the message fails once they pass MAX_RESULT_BYTES."""
    from chroma_snapshots.aws_lambda.query import MAX_RESULT_BYTES

    client = build(tmp_path / "db", {}, dim=DIM)
    try:
        col = client.create_collection("big-docs", embedding_function=None)
        n = MAX_RESULT_BYTES // (100 << 10) + 20  # 100 KB each: past the limit in all
        docs = [f"{i:06d}" + "x" * (100 << 10) for i in range(n)]
        col.add(ids=ids(n), embeddings=cast(Any, [[i / n] * DIM for i in range(n)]),
                documents=docs, metadatas=[{"i": i} for i in range(n)])  # fmt: skip
        body = {"collection": "big-docs", "query_embeddings": [[0.5] * DIM], "n_results": n}
        with pytest.raises(InvalidInputError, match="come to more than 6291456 bytes"):
            default_query(client, body)
        fits = default_query(client, {**body, "n_results": 10})  # 1 MB: answered
        assert [d[:6] for d in fits["documents"][0]] == [i.split("-")[1].zfill(6)
                                                         for i in fits["ids"][0]]  # fmt: skip
        assert [m["i"] for m in fits["metadatas"][0]] == [int(i.split("-")[1])
                                                           for i in fits["ids"][0]]  # fmt: skip
    finally:
        close_client(client)


def ids(n: int) -> list[str]:
    return [f"receipts-{i}" for i in range(n)]


@pytest.mark.parametrize(
    ("var", "value", "says", "fine"),
    [
        ("CHROMA_SNAPSHOTS_RESERVE_SECONDS", "900", "leaves no time for any message", "899"),
        ("CHROMA_SNAPSHOTS_RESERVE_SECONDS", " 1e3 ", "leaves no time for any message", "0.5"),
        ("CHROMA_SNAPSHOTS_LOCK_TABLE", "1", "is not a DynamoDB table name", "locks"),
        ("CHROMA_SNAPSHOTS_LOCK_TABLE", "my locks", "is not a DynamoDB table name", "my.locks-1"),
        (
            "CHROMA_SNAPSHOTS_LOCK_TABLE",
            "arn:aws:dynamodb:us-east-1:123:table/locks",
            "is not a DynamoDB table name",
            "arn:aws:dynamodb:us-east-1:123456789012:table/locks",
        ),
    ],
)
def test_lambda_settings_that_can_never_work_fail_the_cold_start(
    tmp_path: Path, var: str, value: str, says: str, fine: str
) -> None:
    """Accepted before, they failed or skipped every message of every invocation."""
    env = {"CHROMA_SNAPSHOTS_URL": str(tmp_path / "store"), "CHROMA_SNAPSHOTS_NAME": "db"}
    with pytest.raises(ConfigError, match=f"^{var}=.*{says}"):
        LambdaConfig.from_env({**env, var: value})
    assert LambdaConfig.from_env({**env, var: fine}).name == "db"
