"""aws-lambda-powertools integration (extra ``powertools``): compose the bundled handlers'
logic into your own Powertools handler.

- :class:`RecordHandler` is a record handler for Powertools' ``BatchProcessor`` /
  ``process_partial_response``: it runs a :class:`~.query.QueryHandler`'s or
  :class:`~.compactor.CompactionHandler`'s work one record at a time and raises for a
  record that failed, so Powertools reports exactly the ``batchItemFailures`` the bundled
  handler would (with ``raise_on_entire_batch_failure=False``; Powertools' default raises
  ``BatchProcessingError`` when every record failed, which also returns the whole batch).
  The compactor's deltas are still compacted together, as one publish, on the first record.
- :func:`use_powertools_logger` sends this library's log lines (with their fields:
  version, stale, bytes, ...) through a Powertools ``Logger``, and
  :func:`use_powertools_metrics` its batch metrics into a Powertools ``Metrics``.

Only this module imports aws_lambda_powertools; the bundled handlers do not need it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, cast

from chroma_snapshots.aws_lambda import common
from chroma_snapshots.aws_lambda.batch import (
    BatchOutcome,
    JsonFormatter,
    Message,
    log,
    parse,
    records,
)
from chroma_snapshots.aws_lambda.common import SqsHandler
from chroma_snapshots.engine.deadline import Deadline, LambdaContext
from chroma_snapshots.errors import InvalidInputError, StorageTimeoutError

__all__ = ["RecordHandler", "process_batch", "use_powertools_logger", "use_powertools_metrics"]


class RecordHandler:
    """``record_handler`` for Powertools' batch utilities, bound to one event::

        chroma = QueryHandler.from_env()          # once per container (init phase)
        processor = BatchProcessor(EventType.SQS, raise_on_entire_batch_failure=False)

        def lambda_handler(event, context):
            records = RecordHandler(chroma, event, context)
            response = process_partial_response(event, records, processor, context)
            records.finish()                      # the summary log line and metrics
            return response

    Records must be processed in the event's order (Powertools' ``BatchProcessor`` does).
    """

    def __init__(self, handler: SqsHandler, event: Any, context: LambdaContext) -> None:
        self.handler, self.context = handler, context
        self.deadline = Deadline.from_lambda_context(context, reserve=handler.config.reserve)
        self.fields: dict[str, Any] = {}
        self.outcomes: dict[str, Exception | None] = {}
        self._poison: list[str] = []
        self._t0 = time.monotonic()
        good: list[Message] = []
        for rec in records(event):
            try:
                good.append(parse(rec))
            except InvalidInputError:
                continue  # raised again when Powertools hands that record over
        self._work: Iterator[tuple[str, Exception | None]] | None = None
        self._good = good

    def __call__(self, record: Any) -> None:
        """Process one record (an ``SQSRecord`` or the raw dict); raise if it failed."""
        raw = getattr(record, "raw_event", record)
        try:
            message = parse(raw)
        except InvalidInputError:  # a poison message, as in the bundled handler
            self._poison.append(str(raw.get("messageId", "?")) if isinstance(raw, dict) else "?")
            raise
        while message.message_id not in self.outcomes and self._advance():
            pass
        if message.message_id not in self.outcomes:
            raise StorageTimeoutError(
                f"message {message.message_id} left for a retry: the deadline reserve was reached"
            )
        error = self.outcomes[message.message_id]
        if error is not None:
            raise error

    def _advance(self) -> bool:
        """Let the handler's work produce one more outcome; False when it has no more."""
        if self._work is None:
            if self.deadline.expired():
                return False
            self._work = self.handler.work(self._good, self.deadline, self.fields)
        try:
            message_id, error = next(self._work)
        except StopIteration:
            return False
        self.outcomes[message_id] = error
        return True

    def finish(self) -> None:
        """Log the batch summary and emit its metrics, as the bundled handler does."""
        outcome = BatchOutcome(poison=list(self._poison))
        for message_id, error in self.outcomes.items():
            if error is None:
                outcome.processed.append(message_id)
            elif isinstance(error, InvalidInputError):
                outcome.poison.append(message_id)
            else:
                outcome.failed.append(message_id)
        outcome.unprocessed = [m for m in self._good if m.message_id not in self.outcomes]
        fields = {**self.fields, "seconds": round(time.monotonic() - self._t0, 4)}
        h = self.handler
        common.summarize(h.config, outcome, self.context, h.kind, fields, h.metrics_sink)


def process_batch(handler: SqsHandler, event: Any, context: LambdaContext) -> dict[str, Any]:
    """The bundled handler's behaviour through Powertools: ``process_partial_response`` with
    a ``BatchProcessor`` that reports every failure (none raised for a fully failed batch)."""
    from aws_lambda_powertools.utilities.batch import (
        BatchProcessor,
        EventType,
        process_partial_response,
    )

    processor = BatchProcessor(EventType.SQS, raise_on_entire_batch_failure=False)
    handler_for_event = RecordHandler(handler, event, context)
    response = process_partial_response(event, handler_for_event, processor, cast(Any, context))
    handler_for_event.finish()
    return dict(response)


def use_powertools_logger(logger: Any) -> None:
    """Send this library's log lines through a Powertools ``Logger`` (its handler and
    formatter: correlation ids, cold start, your keys) instead of its own JSON lines."""
    from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers

    for h in list(log.handlers):
        if isinstance(h.formatter, JsonFormatter):
            log.removeHandler(h)
    log.propagate = True
    common.external_logging(True)
    logging.getLogger("chroma_snapshots")  # registered, so Powertools finds it
    copy_config_to_registered_loggers(source_logger=logger, include={"chroma_snapshots"})


def use_powertools_metrics(handler: SqsHandler, metrics: Any) -> None:
    """Add ``handler``'s batch metrics (Processed, Failed, Unprocessed, Seconds) to a
    Powertools ``Metrics`` (flushed by its ``log_metrics``) instead of printing EMF."""
    from aws_lambda_powertools.metrics import MetricUnit

    def sink(values: dict[str, float], dimensions: dict[str, str]) -> None:
        for key, label in dimensions.items():
            metrics.add_dimension(name=key, value=label)
        for key, value in values.items():
            unit = MetricUnit.Seconds if key == "Seconds" else MetricUnit.Count
            metrics.add_metric(name=key, unit=unit, value=value)

    handler.metrics_sink = sink
