"""A compactor written the Powertools way: chroma-snapshots' record handler inside your own
Lambda handler, with Powertools' Logger, Metrics, BatchProcessor and idempotency.

Deploy with handler ``powertools_compactor.lambda_handler``, the bundled compactor's
environment (``CHROMA_SNAPSHOTS_*``) and ``IDEMPOTENCY_TABLE`` (a DynamoDB table with
partition key ``id``, Powertools' default).
Needs ``pip install 'chroma-snapshots[chroma,powertools]'``.

Idempotency. The library is idempotent on its own: a published version's manifest lists
the delta ids applied so far (the last 10,000), so a redelivered delta is skipped, and the
application of a delta is identified by its id plus the base version it was applied to
(``CompactionResult.base``; the handler logs ``applied``, ``base`` and ``version``).
Powertools' idempotency composes on top for what the library does not own, such as a
side effect that must happen once per delta: key it on the delta id (``"delta"`` here, or
``powertools_json(body).id`` on a whole SQS record), never on the SQS messageId (a
producer that sends a delta again gets a new one), and store the base and version with it.
A redelivery then finds the stored result; if that record expired (``expires_after_seconds``)
the manifest still keeps the delta from being applied twice.
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from chroma_snapshots.aws_lambda.compactor import CompactionHandler
from chroma_snapshots.aws_lambda.powertools import (
    RecordHandler,
    use_powertools_logger,
    use_powertools_metrics,
)

logger = Logger(service="chroma-compactor")
metrics = Metrics(namespace="ChromaSnapshots", service="chroma-compactor")
use_powertools_logger(logger)  # the library's log lines, through your Logger
compactor = CompactionHandler.from_env()  # init phase: bad configuration fails the cold start
use_powertools_metrics(compactor, metrics)
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
idempotency = IdempotencyConfig(event_key_jmespath="delta", expires_after_seconds=24 * 3600)
persistence = DynamoDBPersistenceLayer(
    table_name=os.environ.get("IDEMPOTENCY_TABLE", "idempotency")
)


@idempotent_function(  # type: ignore[untyped-decorator]
    data_keyword_argument="applied", config=idempotency, persistence_store=persistence
)
def announce(applied: dict[str, Any]) -> dict[str, Any]:
    """Once per delta (an event to other systems, here a log line): its base and version."""
    logger.info("delta in the snapshot", extra=applied)
    return applied


@logger.inject_lambda_context
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    idempotency.register_lambda_context(context)
    records = RecordHandler(compactor, event, context)

    def record_handler(record: SQSRecord) -> None:
        records(record)  # raises if this record failed: Powertools reports it for a retry
        delta = str(record.json_body["id"])
        fields = records.fields
        # applied now (base and version known) or skipped: applied by an earlier delivery,
        # whose announcement the idempotency table answers (or, expired, is made again)
        base = fields.get("base") if delta in fields.get("applied", []) else None
        announce(applied={"delta": delta, "base": base, "version": fields.get("version")})

    response = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    records.finish()
    return dict(response)
