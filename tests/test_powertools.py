"""The Powertools path (extra ``powertools``), offline against moto and real chroma: the same
batch gives the same ``batchItemFailures`` through the bundled handlers and through
Powertools' ``BatchProcessor``; the Logger and Metrics bridges carry the library's output."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chroma_helpers import build

pytest.importorskip("aws_lambda_powertools", reason="extra 'powertools'")
if os.environ.get("CI"):
    import aws_lambda_powertools  # noqa: F401  (CI installs the extra: a skip would hide it)

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)

from chroma_snapshots.aws_lambda import common
from chroma_snapshots.aws_lambda.batch import log as library_log
from chroma_snapshots.aws_lambda.compactor import CompactionHandler
from chroma_snapshots.aws_lambda.powertools import (
    RecordHandler,
    process_batch,
    use_powertools_logger,
    use_powertools_metrics,
)
from chroma_snapshots.aws_lambda.query import QueryHandler
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.chroma import publish_client
from chroma_snapshots.compaction import applied_ids
from chroma_snapshots.config import LambdaConfig
from chroma_snapshots.stores.remote import RemoteStore
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.lambda_context import FakeContext

DIM = 8


def sqs_event(*bodies: Any) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"m{i}",
                "receiptHandle": f"rh{i}",
                "body": body if isinstance(body, str) else json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1"},
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:queue",
                "eventSource": "aws:sqs",
            }
            for i, body in enumerate(bodies)
        ]
    }


def failures(response: dict[str, Any]) -> list[str]:
    return [f["itemIdentifier"] for f in response["batchItemFailures"]]


@pytest.fixture
def seeded(moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> RemoteStore:
    settings = S3Settings(endpoint_url=moto_server.endpoint_url)
    store = RemoteStore(S3Backend(s3_bucket, "snaps", settings=settings))
    for name in ("bundled", "powertools"):
        publish_client(store, name, build(tmp_path / name, {"receipts": 30}, dim=DIM))
    return store


def config(moto_server: MotoServer, bucket: str, tmp_path: Path, name: str) -> LambdaConfig:
    return LambdaConfig.from_env(
        {
            "CHROMA_SNAPSHOTS_URL": f"s3://{bucket}/snaps",
            "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url,
            "CHROMA_SNAPSHOTS_NAME": name,
            "CHROMA_SNAPSHOTS_CACHE_DIR": str(tmp_path / f"cache-{name}"),
            "CHROMA_SNAPSHOTS_RESERVE_SECONDS": "1",
        }
    )


def delta(name: str, dim: int = DIM) -> dict[str, Any]:
    return {
        "id": name,
        "collection": "receipts",
        "upserts": [{"id": f"{name}-r", "embedding": [0.25] * dim}],
    }


def test_compaction_gives_the_same_failures_both_ways(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path, seeded: RemoteStore
) -> None:
    event = sqs_event(
        delta("d0"),
        "{not json",
        {"id": "d2", "collection": "receipts", "upserts": [{"id": "x"}]},  # no embedding
        delta("d3", dim=DIM + 2),  # chroma would refuse it: wrong dimension
        delta("d4"),
    )
    bundled = CompactionHandler(config(moto_server, s3_bucket, tmp_path, "bundled"))
    powertools = CompactionHandler(config(moto_server, s3_bucket, tmp_path, "powertools"))
    want = failures(bundled(event, FakeContext(120)))
    assert sorted(want) == ["m1", "m2", "m3"]
    got = failures(process_batch(powertools, event, FakeContext(120)))
    assert sorted(got) == sorted(want)
    for name in ("bundled", "powertools"):  # both published the good deltas, once
        assert sorted(applied_ids(seeded.resolve(name))) == ["d0", "d4"]


def test_a_delta_id_that_is_not_utf8_fails_alone_both_ways(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path, seeded: RemoteStore
) -> None:
    """A lone surrogate in a delta id failed every message of the batch (the manifest could
    not be encoded): now only that message, through either path."""
    event = sqs_event(delta("d0"), {**delta("evil"), "id": "evil-\ud800"}, delta("d2"))
    bundled = CompactionHandler(config(moto_server, s3_bucket, tmp_path, "bundled"))
    powertools = CompactionHandler(config(moto_server, s3_bucket, tmp_path, "powertools"))
    assert failures(bundled(event, FakeContext(120))) == ["m1"]
    assert failures(process_batch(powertools, event, FakeContext(120))) == ["m1"]
    for name in ("bundled", "powertools"):
        assert applied_ids(seeded.resolve(name)) == ["d0", "d2"]


def test_query_gives_the_same_failures_both_ways(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path, seeded: RemoteStore
) -> None:
    query = {"collection": "receipts", "query_embeddings": [[0.5] * DIM], "n_results": 2}
    event = sqs_event(
        query,
        "not json",
        {"collection": "no-such-collection", "query_embeddings": [[0.5] * DIM]},
        {**query, "n_results": 0},
        query,
    )
    bundled = QueryHandler(config(moto_server, s3_bucket, tmp_path, "bundled"))
    powertools = QueryHandler(config(moto_server, s3_bucket, tmp_path, "powertools"))
    want = failures(bundled(event, FakeContext(60)))
    assert sorted(want) == ["m1", "m2", "m3"]
    assert sorted(failures(process_batch(powertools, event, FakeContext(60)))) == sorted(want)
    # composed by hand with Powertools' defaults (a mixed batch: nothing raised)
    records = RecordHandler(powertools, event, FakeContext(60))
    processor = BatchProcessor(event_type=EventType.SQS)
    response = process_partial_response(event, records, processor, None)
    assert sorted(failures(dict(response))) == sorted(want)
    # past the deadline's reserve nothing starts: every message comes back, both ways
    late = FakeContext(0.5)
    assert sorted(failures(bundled(event, late))) == [f"m{i}" for i in range(5)]
    late = FakeContext(0.5)
    assert sorted(failures(process_batch(powertools, event, late))) == [f"m{i}" for i in range(5)]
    bundled.close()
    powertools.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    lib = logging.getLogger("chroma_snapshots")
    for h in list(lib.handlers):
        lib.removeHandler(h)
    common.external_logging(False)
    library_log.propagate = False
    common.setup_logging()


@pytest.mark.usefixtures("restore_logging")
def test_logger_and_metrics_bridges(
    moto_server: MotoServer,
    s3_bucket: str,
    tmp_path: Path,
    seeded: RemoteStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger = Logger(service="receipts-search")
    metrics = Metrics(namespace="Chroma", service="receipts-search")
    use_powertools_logger(logger)
    handler = QueryHandler(config(moto_server, s3_bucket, tmp_path, "powertools"))
    use_powertools_metrics(handler, metrics)
    query = {"collection": "receipts", "query_embeddings": [[0.5] * DIM]}
    assert failures(process_batch(handler, sqs_event(query, "oops"), FakeContext(60))) == ["m1"]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    done = [x for x in lines if x.get("message") == "query batch done"]
    assert done
    assert done[-1]["service"] == "receipts-search"  # Powertools' formatter wrote it
    assert done[-1]["version"] == seeded.resolve("powertools").version
    assert not [x for x in lines if "_aws" in x]  # metrics wait for Powertools' flush
    emf: dict[str, Any] = dict(metrics.serialize_metric_set())
    metrics.clear_metrics()
    assert (emf["Processed"], emf["Failed"], emf["Unprocessed"]) == ([1.0], [1.0], [0.0])
    assert (emf["Snapshot"], emf["Handler"]) == ("powertools", "query")
    handler.close()


class PowertoolsContext(FakeContext):
    """What Powertools' Logger reads from a Lambda context, on top of the fake's countdown."""

    function_name = "compactor"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:compactor"
    memory_limit_in_mb = 1024
    log_group_name = "/aws/lambda/compactor"
    log_stream_name = "stream"


@pytest.mark.usefixtures("restore_logging")
def test_the_powertools_example_announces_each_delta_once(
    moto_server: MotoServer,
    s3_bucket: str,
    tmp_path: Path,
    seeded: RemoteStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """examples/lambda/powertools_compactor.py, run twice on the same batch (a redelivery):
    the failures are the bundled handler's, and each delta is announced once."""
    table = f"idempotency-{os.urandom(4).hex()}"
    moto_server.client_for("dynamodb").create_table(
        TableName=table,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
    )
    env = {
        "CHROMA_SNAPSHOTS_URL": f"s3://{s3_bucket}/snaps",
        "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url,
        "AWS_ENDPOINT_URL_DYNAMODB": moto_server.endpoint_url,
        "CHROMA_SNAPSHOTS_NAME": "powertools",
        "CHROMA_SNAPSHOTS_CACHE_DIR": str(tmp_path / "cache"),
        "IDEMPOTENCY_TABLE": table,
        "POWERTOOLS_METRICS_NAMESPACE": "Chroma",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    examples = Path(__file__).parent.parent / "examples" / "lambda"
    monkeypatch.syspath_prepend(str(examples))
    monkeypatch.delitem(sys.modules, "powertools_compactor", raising=False)
    example = importlib.import_module("powertools_compactor")
    event = sqs_event(delta("d0"), "{not json", delta("d2", dim=DIM + 1), delta("d3"))
    for _ in range(2):
        response = example.lambda_handler(event, PowertoolsContext(120))
        assert sorted(failures(response)) == ["m1", "m2"]
    assert sorted(applied_ids(seeded.resolve("powertools"))) == ["d0", "d3"]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    announced = [x for x in lines if x.get("message") == "delta in the snapshot"]
    assert sorted(x["delta"] for x in announced) == ["d0", "d3"]  # once, not per delivery
    assert {x["base"] for x in announced} == {next(seeded.versions("powertools")).parent}
    items = moto_server.client_for("dynamodb").scan(TableName=table)["Items"]
    assert len(items) == 2
