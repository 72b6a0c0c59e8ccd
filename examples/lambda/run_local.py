"""Run the query handler locally the way Lambda's SQS event source mapping would.

A local S3 and SQS (moto's HTTP server on 127.0.0.1) stand in for AWS: a chroma snapshot
is published, query messages (and one poison message) are enqueued on a queue whose dead
letter queue takes messages after 2 receives, and a loop receives batches, invokes the
handler with a fake Lambda context, deletes what succeeded and lets failures reappear.

usage: python examples/lambda/run_local.py
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import chromadb

from chroma_snapshots import RemoteStore
from chroma_snapshots.aws_lambda.query import QueryHandler
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.chroma import client_settings, publish_client
from chroma_snapshots.config import LambdaConfig
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.lambda_context import FakeContext

DIM = 8


def publish_snapshot(server: MotoServer, bucket: str, tmp: Path) -> None:
    rng = random.Random(0)
    client = chromadb.PersistentClient(path=str(tmp / "db"), settings=client_settings())
    col = client.get_or_create_collection("receipts", embedding_function=None)
    ids = [f"receipt-{i}" for i in range(100)]
    col.add(
        ids=ids,
        embeddings=cast(Any, [[rng.random() for _ in range(DIM)] for _ in ids]),
        documents=[f"receipt {i}" for i in range(100)],
    )
    publish_client(
        RemoteStore(S3Backend(bucket, "snaps", client=server.client())), "receipts", client
    )


def make_queues(sqs: Any) -> tuple[str, str, str]:
    dlq = sqs.create_queue(QueueName=f"queries-dlq-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue = sqs.create_queue(
        QueueName=f"queries-{uuid.uuid4().hex[:6]}",
        Attributes={
            "VisibilityTimeout": "1",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}),
        },
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return queue, arn, dlq


def as_event(messages: list[dict[str, Any]], arn: str) -> dict[str, Any]:
    """What the event source mapping hands the function."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "eventSourceARN": arn,
                "eventSource": "aws:sqs",
            }
            for m in messages
        ]
    }


def run(server: MotoServer, workdir: Path, *, rounds: int = 20) -> dict[str, Any]:
    """Publish, enqueue, drive the handler until the queue is empty; return what happened."""
    bucket = server.create_bucket()
    publish_snapshot(server, bucket, workdir)
    sqs = server.client_for("sqs")
    queue, arn, dlq = make_queues(sqs)
    bodies = [
        json.dumps({"collection": "receipts", "query_embeddings": [[i / 10] * DIM], "n_results": 2})
        for i in range(3)
    ] + ["this is not JSON"]
    sent = {sqs.send_message(QueueUrl=queue, MessageBody=b)["MessageId"]: b for b in bodies}
    env = {
        "CHROMA_SNAPSHOTS_URL": f"s3://{bucket}/snaps",
        "AWS_ENDPOINT_URL_S3": server.endpoint_url,
        "CHROMA_SNAPSHOTS_NAME": "receipts",
        "CHROMA_SNAPSHOTS_CACHE_DIR": str(workdir / "cache"),
    }
    handler = QueryHandler(LambdaConfig.from_env(env))
    results: dict[str, Any] = {}
    handler.sink = lambda message, result: results.__setitem__(message.message_id, result)
    invocations = []
    for _ in range(rounds):
        got = sqs.receive_message(
            QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1, AttributeNames=["All"]
        ).get("Messages", [])
        if not got:
            if len(results) == 3 and _count(sqs, dlq) >= 1:
                break
            time.sleep(1)  # failed messages come back after the visibility timeout
            continue
        response = handler(as_event(got, arn), FakeContext(30))
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
        invocations.append({"received": len(got), "failed": len(failed)})
        for m in got:
            if m["MessageId"] not in failed:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])
    dead = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10).get("Messages", [])
    handler.close()
    return {
        "sent": sent,
        "results": results,
        "dead_letters": [m["Body"] for m in dead],
        "invocations": invocations,
    }


def _count(sqs: Any, url: str) -> int:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"])


if __name__ == "__main__":
    from chroma_snapshots.cli.localserver import CREDENTIALS

    os.environ.update(CREDENTIALS)  # the handler uses the default AWS credential chain
    with MotoServer() as server, tempfile.TemporaryDirectory() as tmp:
        out = run(server, Path(tmp))
        for mid, result in out["results"].items():
            print(f"{mid}: nearest {result['ids'][0]}")
        print(f"dead letters: {out['dead_letters']}")
        print(f"invocations: {out['invocations']}")
