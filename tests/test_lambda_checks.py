"""Deployment checks (``doctor --lambda``) against functions and queues created in moto."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots.aws_lambda.checks import (
    Deployment,
    check,
    check_function,
    check_stores,
    inspect_function,
)
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.config import StoreConfig
from chroma_snapshots.stores.remote import RemoteStore
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.proxy import closed_endpoint


def deploy(
    server: MotoServer,
    *,
    timeout: int,
    tmp_mb: int,
    visibility: int,
    max_receive: int | None,
    partial: bool,
) -> str:
    """A function fed by an SQS queue, as configured; returns the function's name."""
    lam, sqs, iam = (server.client_for(s) for s in ("lambda", "sqs", "iam"))
    tag = uuid.uuid4().hex[:8]
    role = iam.create_role(RoleName=f"role-{tag}", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as z:
        z.writestr("handler.py", "def handler(event, context):\n    return {}\n")
    name = f"fn-{tag}"
    lam.create_function(
        FunctionName=name,
        Runtime="python3.12",
        Role=role,
        Handler="handler.handler",
        Code={"ZipFile": code.getvalue()},
        Timeout=timeout,
        EphemeralStorage={"Size": tmp_mb},
    )
    attrs = {"VisibilityTimeout": str(visibility)}
    if max_receive is not None:
        dlq = sqs.create_queue(QueueName=f"dlq-{tag}")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])
        policy = {
            "deadLetterTargetArn": dlq_arn["Attributes"]["QueueArn"],
            "maxReceiveCount": max_receive,
        }
        attrs["RedrivePolicy"] = json.dumps(policy)
    queue = sqs.create_queue(QueueName=f"q-{tag}", Attributes=attrs)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
    extra: dict[str, Any] = (
        {"FunctionResponseTypes": ["ReportBatchItemFailures"]} if partial else {}
    )
    lam.create_event_source_mapping(
        EventSourceArn=arn["Attributes"]["QueueArn"], FunctionName=name, BatchSize=10, **extra
    )
    return name


def failing(findings: list[Any]) -> set[str]:
    return {f.check for f in findings if not f.ok}


def clients(server: MotoServer) -> dict[str, Any]:
    return {"lambda_client": server.client_for("lambda"), "sqs_client": server.client_for("sqs")}


def test_a_well_configured_function_passes(moto_server: MotoServer) -> None:
    name = deploy(moto_server, timeout=60, tmp_mb=2048, visibility=360, max_receive=5, partial=True)
    (found,) = inspect_function(name, snapshot_bytes=900 << 20, **clients(moto_server))
    assert (found.timeout, found.ephemeral_mb, found.visibility_timeout) == (60, 2048, 360)
    findings = check(found)
    assert {f.check for f in findings} == {
        "visibility",
        "dead-letter-queue",
        "partial-batch-response",
        "tmp-size",
    }
    assert failing(findings) == set()


def test_what_the_field_got_wrong_is_reported(moto_server: MotoServer) -> None:
    name = deploy(moto_server, timeout=60, tmp_mb=512, visibility=120, max_receive=2, partial=False)
    findings = check_function(name, **clients(moto_server))
    assert failing(findings) == {"visibility", "dead-letter-queue", "partial-batch-response"}
    detail = {f.check: f.detail for f in findings}
    assert ">= 360 s" in detail["visibility"]
    assert "maxReceiveCount 2" in detail["dead-letter-queue"]
    no_dlq = deploy(
        moto_server, timeout=10, tmp_mb=512, visibility=60, max_receive=None, partial=True
    )
    assert failing(check_function(no_dlq, **clients(moto_server))) == {"dead-letter-queue"}


def test_tmp_against_the_latest_snapshot(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    store = RemoteStore(
        S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url))
    )
    src = tmp_path / "snap"
    src.mkdir()
    (src / "data.bin").write_bytes(b"x" * (300 << 20))  # 300 MiB: /tmp of 512 MB is too small
    store.publish("db", src)
    name = deploy(moto_server, timeout=60, tmp_mb=512, visibility=360, max_receive=5, partial=True)
    found = check_function(name, store=store, name="db", **clients(moto_server))
    assert failing(found) == {"tmp-size"}
    assert ">= 600 MB" in next(f.detail for f in found if f.check == "tmp-size")


def test_a_function_without_a_queue_is_a_finding(moto_server: MotoServer) -> None:
    lam = moto_server.client_for("lambda")
    name = deploy(moto_server, timeout=60, tmp_mb=512, visibility=360, max_receive=5, partial=True)
    for m in lam.list_event_source_mappings(FunctionName=name)["EventSourceMappings"]:
        lam.delete_event_source_mapping(UUID=m["UUID"])
    assert failing(check_function(name, **clients(moto_server))) == {"event-source"}


@pytest.mark.parametrize(
    ("snapshot_mib", "tmp_mb", "ok"), [(1024, 2048, True), (1024, 2047, False), (100, 512, True)]
)
def test_tmp_rule(snapshot_mib: int, tmp_mb: int, ok: bool) -> None:
    redrive = {"deadLetterTargetArn": "arn:dlq", "maxReceiveCount": 5}
    partial = ["ReportBatchItemFailures"]
    d = Deployment("fn", 60, tmp_mb, "q", 360, redrive, partial, snapshot_mib << 20)
    assert {f.check: f.ok for f in check(d)}["tmp-size"] is ok


def test_stores_answer_within_their_budgets(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    store = RemoteStore(
        S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url))
    )
    src = tmp_path / "snap"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    version = store.publish("db", src).version
    (tmp_path / "empty").mkdir()
    cfg = StoreConfig(
        url=f"s3://{s3_bucket}/snaps",
        fallback_url=f"file://{tmp_path / 'empty'}",
        s3_endpoint_url=moto_server.endpoint_url,
        s3_timeout=5,
    )
    found = check_stores(cfg, "db")
    assert [f.ok for f in found] == [True, False]  # the fallback has no snapshot "db"
    assert version in found[0].detail
    assert "budget 5 s" in found[0].detail
    with closed_endpoint() as url:
        down = replace(cfg, s3_endpoint_url=url, fallback_url=None)
        (finding,) = check_stores(down, "db")
    assert not finding.ok
    assert "BackendUnavailableError" in finding.detail


def test_before_the_first_publish_the_snapshot_is_a_finding(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    store = RemoteStore(
        S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url))
    )
    name = deploy(moto_server, timeout=60, tmp_mb=512, visibility=360, max_receive=5, partial=True)
    found = check_function(name, store=store, name="db", **clients(moto_server))
    assert failing(found) == {"snapshot"}  # the queue's checks still ran, and passed
    assert {"visibility", "dead-letter-queue", "partial-batch-response"} <= {f.check for f in found}
    assert "no ref 'latest'" in next(f.detail for f in found if f.check == "snapshot")


def test_a_function_that_does_not_exist_is_a_finding(moto_server: MotoServer) -> None:
    (finding,) = check_function("no-such-function", **clients(moto_server))
    assert (finding.check, finding.ok) == ("function", False)
    assert "no such function" in finding.detail


def test_a_store_whose_bucket_does_not_exist_says_so(moto_server: MotoServer) -> None:
    cfg = StoreConfig(
        url=f"s3://missing-{uuid.uuid4().hex[:8]}/snaps",
        s3_endpoint_url=moto_server.endpoint_url,
        s3_timeout=5,
    )
    (finding,) = check_stores(cfg, "db")
    assert not finding.ok
    assert "does not exist (S3 NoSuchBucket)" in finding.detail
    assert "no ref" not in finding.detail
