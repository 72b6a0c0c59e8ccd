"""SQS batch mechanics shared by the handlers: partial failures, poison messages, deadlines.

The response matches aws-lambda-powertools' ``BatchProcessor`` (``{"batchItemFailures":
[{"itemIdentifier": messageId}, ...]}`` with ``ReportBatchItemFailures`` on the event
source mapping), without adding powertools to every Lambda package: one bad message never
fails the batch, and messages left unprocessed near the deadline are reported as failures
(and, if configured, made visible again at once) instead of dying with the invocation.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chroma_snapshots.engine.deadline import Deadline, LambdaContext
from chroma_snapshots.errors import InvalidInputError

log = logging.getLogger("chroma_snapshots.aws_lambda")
_COUNT = re.compile(r"[0-9]{1,9}")  # an ApproximateReceiveCount


@dataclass(frozen=True)
class Message:
    """One SQS record: its id, parsed JSON body, and where it came from."""

    message_id: str
    body: Any
    receipt_handle: str
    queue_arn: str
    receive_count: int


@dataclass
class BatchOutcome:
    """What happened to each message of a batch."""

    processed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    poison: list[str] = field(default_factory=list)
    unprocessed: list[Message] = field(default_factory=list)

    def response(self) -> dict[str, list[dict[str, str]]]:
        """The Lambda response SQS's ReportBatchItemFailures understands."""
        ids = self.poison + self.failed + [m.message_id for m in self.unprocessed]
        return {"batchItemFailures": [{"itemIdentifier": i} for i in ids]}


def parse(record: Any) -> Message:
    """An SQS event record as a Message; InvalidInputError for a poison message."""
    if not isinstance(record, dict) or "messageId" not in record:
        raise InvalidInputError("not an SQS record")
    raw = record.get("body")
    if raw is not None and not isinstance(raw, str):  # SQS sends text; a hand-made event
        raise InvalidInputError(f"body is not text but {type(raw).__name__}")
    try:
        body = json.loads(raw or "")
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise InvalidInputError(f"body is not JSON: {e}") from None
    attrs = record.get("attributes")
    count = attrs.get("ApproximateReceiveCount") if isinstance(attrs, dict) else None
    return Message(
        str(record["messageId"]),
        body,
        str(record.get("receiptHandle", "")),
        str(record.get("eventSourceARN", "")),
        _receive_count(count),
    )


def _receive_count(count: object) -> int:
    # ASCII digits only ("²".isdigit() is True, int() refuses it; 5,000 digits exceed
    # int()'s limit, and str() of such an int raises): anything else is a first delivery
    if isinstance(count, int) and not isinstance(count, bool):
        return count if 0 <= count < 10**9 else 1
    return int(count) if isinstance(count, str) and _COUNT.fullmatch(count) else 1


def records(event: Any) -> list[Any]:
    """The SQS records of a Lambda event (an empty list for anything else, a ``Records``
    that is not a list included)."""
    got = event.get("Records") if isinstance(event, dict) else None
    return list(got) if isinstance(got, list) else []


def run_batch(
    event: Any,
    context: LambdaContext,
    reserve: float,
    work: Callable[[list[Message], Deadline], Iterator[tuple[str, Exception | None]]],
) -> BatchOutcome:
    """Parse every record (poison ones fail alone), then let ``work`` process the good ones in
    order, yielding ``(message_id, error_or_None)``; stop when the deadline's reserve is
    reached and report the rest as unprocessed."""
    outcome = BatchOutcome()
    good: list[Message] = []
    for rec in records(event):
        try:
            good.append(parse(rec))
        except InvalidInputError as e:
            mid = rec.get("messageId", "?") if isinstance(rec, dict) else "?"
            log.error("poison message %s: %s", mid, e, extra={"message_id": mid})
            outcome.poison.append(str(mid))
    deadline = Deadline.from_lambda_context(context, reserve=reserve)
    done: set[str] = set()
    if good and not deadline.expired():
        for message_id, error in work(good, deadline):
            done.add(message_id)
            if error is None:
                outcome.processed.append(message_id)
            else:
                if isinstance(error, InvalidInputError):
                    outcome.poison.append(message_id)
                else:
                    outcome.failed.append(message_id)
                log.error(
                    "message %s failed: %s: %s",
                    message_id,
                    type(error).__name__,
                    error,
                    extra={"message_id": message_id},
                )
    outcome.unprocessed = [m for m in good if m.message_id not in done]
    if outcome.unprocessed:
        log.warning(
            "deadline reserve reached: %d messages left for a retry", len(outcome.unprocessed)
        )
    return outcome


def release(messages: list[Message], sqs: Any) -> None:
    """Make unprocessed messages visible again now (not after the visibility timeout)."""
    urls: dict[str, str] = {}  # queue ARN -> URL: one lookup per queue, not per message
    for m in messages:
        parts = m.queue_arn.split(":")
        if len(parts) < 6:
            continue
        try:
            if m.queue_arn not in urls:
                found = sqs.get_queue_url(QueueName=parts[5], QueueOwnerAWSAccountId=parts[4])
                urls[m.queue_arn] = found["QueueUrl"]
            url = urls[m.queue_arn]
            sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=m.receipt_handle, VisibilityTimeout=0
            )
        except Exception as e:  # best effort: the visibility timeout still brings it back
            log.warning("could not release message %s: %s", m.message_id, type(e).__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the structured fields handlers attach."""

    FIELDS = (
        "request_id",
        "message_id",
        "snapshot",
        "version",
        "source",
        "stale",
        "bytes_downloaded",
        "requests",
        "seconds",
        "processed",
        "failed",
        "unprocessed",
        "result",
        "applied",
        "skipped",
        "rejected",
        "base",
        "attempts",
    )

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "time": time.time(),
        }
        for key in self.FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        return json.dumps(out, default=str)


def emf(namespace: str, metrics: dict[str, float], dimensions: dict[str, str]) -> str:
    """A CloudWatch embedded-metric-format line (printed to stdout, CloudWatch extracts it)."""
    return json.dumps(
        {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": namespace,
                        "Dimensions": [list(dimensions)],
                        "Metrics": [{"Name": k} for k in metrics],
                    }
                ],
            },
            **dimensions,
            **metrics,
        }
    )
