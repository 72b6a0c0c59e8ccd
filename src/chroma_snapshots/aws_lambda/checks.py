"""Deployment checks for the Lambda handlers (``doctor --lambda``): what the field got wrong.

:func:`check` judges one function and the SQS queue that feeds it, as AWS describes them
(``lambda:GetFunctionConfiguration``, ``lambda:ListEventSourceMappings``,
``sqs:GetQueueAttributes``); :func:`inspect_function` collects that with boto3 clients.
Both work offline against moto, and :func:`check` against any description (the infra
example's Pulumi outputs).

- the queue's visibility timeout is at least 6x the function timeout (AWS's advice: a
  message still being processed must not be delivered again);
- a dead-letter queue with ``maxReceiveCount`` >= 5 (fewer lets throttling alone
  dead-letter good messages);
- ``ReportBatchItemFailures`` on the event source mapping (otherwise one failed message
  returns the whole batch, and the handlers' partial responses are ignored);
- /tmp holds at least 2x the snapshot (the cached version and the next one beside it);
- each store (EFS, S3) answers within its budget (:func:`check_stores`).

:func:`check_function` does it all for a deployed function: ``check_function("query-fn",
store=open_store(), name="receipts")`` (the snapshot's size from the store's latest).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chroma_snapshots.config import StoreConfig
from chroma_snapshots.errors import SnapshotNotFoundError
from chroma_snapshots.opening import remote_for

VISIBILITY_FACTOR = 6
MIN_RECEIVE_COUNT = 5
TMP_FACTOR = 2


@dataclass(frozen=True)
class Deployment:
    """One function and its SQS event source, in the terms AWS uses."""

    function: str
    timeout: float
    ephemeral_mb: int
    queue: str
    visibility_timeout: float
    redrive_policy: Mapping[str, Any] | None
    response_types: Sequence[str]
    snapshot_bytes: int | None = None


@dataclass(frozen=True)
class Finding:
    """One check: its name, whether it passed, and what was seen (and the fix)."""

    check: str
    ok: bool
    detail: str


def check(d: Deployment) -> list[Finding]:
    """Every check on ``d`` (failing ones say the fix)."""
    want = VISIBILITY_FACTOR * d.timeout
    out = [
        Finding(
            "visibility",
            d.visibility_timeout >= want,
            f"{d.queue} visibility timeout {d.visibility_timeout:g} s, function timeout "
            f"{d.timeout:g} s: want >= {want:g} s ({VISIBILITY_FACTOR}x)",
        ),
        _redrive(d),
        Finding(
            "partial-batch-response",
            "ReportBatchItemFailures" in d.response_types,
            f"event source mapping {d.queue} -> {d.function} function response types "
            f"{list(d.response_types)}: want ReportBatchItemFailures",
        ),
    ]
    if d.snapshot_bytes is not None:
        need_mb = -(-TMP_FACTOR * d.snapshot_bytes // (1 << 20))
        out.append(
            Finding(
                "tmp-size",
                d.ephemeral_mb >= need_mb,
                f"{d.function} /tmp {d.ephemeral_mb} MB, snapshot {d.snapshot_bytes} bytes: "
                f"want >= {need_mb} MB ({TMP_FACTOR}x the snapshot; Lambda allows 10240)",
            )
        )
    return out


def _redrive(d: Deployment) -> Finding:
    policy = d.redrive_policy or {}
    target = policy.get("deadLetterTargetArn")
    count = int(policy.get("maxReceiveCount", 0) or 0)
    ok = bool(target) and count >= MIN_RECEIVE_COUNT
    seen = (
        f"dead-letter queue {target}, maxReceiveCount {count}" if target else "no dead-letter queue"
    )
    return Finding(
        "dead-letter-queue",
        ok,
        f"{d.queue}: {seen}: want a dead-letter queue with maxReceiveCount >= {MIN_RECEIVE_COUNT}",
    )


def check_function(
    function: str,
    *,
    lambda_client: Any = None,
    sqs_client: Any = None,
    store: Any = None,
    name: str | None = None,
) -> list[Finding]:
    """Every check on every SQS event source of a deployed ``function`` (boto3's default
    clients unless given); with ``store`` and ``name``, /tmp against the latest version.
    What is wrong is a failing finding, never an exception: a function with no SQS event
    source mapping (``event-source``), a function that does not exist (``function``), no
    version of ``name`` published yet, or a store without its bucket (``snapshot``)."""
    import boto3

    lam = lambda_client or boto3.client("lambda")
    sqs = sqs_client or boto3.client("sqs")
    out: list[Finding] = []
    size = None
    if store is not None and name:
        try:
            size = store.resolve(name).total_size
        except SnapshotNotFoundError as e:  # also StoreNotFoundError: no bucket
            detail = f"{name}: {e}: /tmp not checked; a query handler fails every message until "
            out.append(Finding("snapshot", False, detail + "a version is published"))
    try:
        found = inspect_function(function, lambda_client=lam, sqs_client=sqs, snapshot_bytes=size)
    except Exception as e:
        if _error_code(e) != "ResourceNotFoundException":
            raise
        return [*out, Finding("function", False, f"{function}: no such function ({e})")]
    if not found:
        out.append(Finding("event-source", False, f"{function} has no SQS event source mapping"))
    return out + [f for d in found for f in check(d)]


def _error_code(e: Exception) -> str:
    """A botocore ClientError's code (without importing botocore), else ''."""
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def inspect_function(
    function: str, *, lambda_client: Any, sqs_client: Any, snapshot_bytes: int | None = None
) -> list[Deployment]:
    """One Deployment per SQS event source mapping of ``function`` (read with boto3)."""
    cfg = lambda_client.get_function_configuration(FunctionName=function)
    mappings = lambda_client.list_event_source_mappings(FunctionName=function)
    out = []
    for m in mappings.get("EventSourceMappings", []):
        arn = str(m.get("EventSourceArn", ""))
        parts = arn.split(":")
        if len(parts) < 6 or parts[2] != "sqs":
            continue
        url = sqs_client.get_queue_url(QueueName=parts[5], QueueOwnerAWSAccountId=parts[4])
        attrs = sqs_client.get_queue_attributes(
            QueueUrl=url["QueueUrl"], AttributeNames=["VisibilityTimeout", "RedrivePolicy"]
        )["Attributes"]
        redrive = attrs.get("RedrivePolicy")
        out.append(
            Deployment(
                function=function,
                timeout=float(cfg["Timeout"]),
                ephemeral_mb=int(cfg.get("EphemeralStorage", {}).get("Size", 512)),
                queue=parts[5],
                visibility_timeout=float(attrs.get("VisibilityTimeout", 30)),
                redrive_policy=json.loads(redrive) if redrive else None,
                response_types=list(m.get("FunctionResponseTypes") or []),
                snapshot_bytes=snapshot_bytes,
            )
        )
    return out


def check_stores(cfg: StoreConfig, name: str) -> list[Finding]:
    """Whether each store of ``cfg`` (the store, and its fallback) answers for ``name``
    within its budget: ``efs_timeout`` for an ``efs://`` mount, ``s3_timeout`` otherwise.
    One ref read each, the request a warm invocation makes."""
    urls = [cfg.url] + ([cfg.fallback_url] if cfg.fallback_url else [])
    out = []
    for url in urls:
        budget = cfg.efs_timeout if url.startswith("efs://") else cfg.s3_timeout
        t0 = time.monotonic()
        try:
            version, _ = remote_for(cfg, url, create=False).current_version(name, deadline=budget)
        except Exception as e:  # what the function would meet: say it, do not raise
            took = time.monotonic() - t0
            detail = f"{url}: {type(e).__name__}: {e} after {took:.2f} s (budget {budget:g} s)"
            out.append(Finding("store-reachable", False, detail))
            continue
        took = time.monotonic() - t0
        detail = f"{url}: {name} is at {version}, read in {took:.2f} s (budget {budget:g} s)"
        out.append(Finding("store-reachable", True, detail))
    return out
