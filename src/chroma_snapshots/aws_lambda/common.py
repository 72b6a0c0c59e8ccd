"""What both handlers share: cold-start configuration, plug-in loading, logging, metrics."""

from __future__ import annotations

import importlib
import logging
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from chroma_snapshots.aws_lambda.batch import (
    BatchOutcome,
    JsonFormatter,
    Message,
    emf,
    log,
    release,
    run_batch,
)
from chroma_snapshots.config import LambdaConfig
from chroma_snapshots.engine.cleanup import wait_for_cleanups
from chroma_snapshots.engine.deadline import Deadline, LambdaContext, run_within
from chroma_snapshots.errors import ConfigError, StorageTimeoutError

H = TypeVar("H", bound="SqsHandler")
Results = Iterator[tuple[str, Exception | None]]


MetricsSink = Callable[[dict[str, float], dict[str, str]], None]
_external_logging = False  # set when another logging setup (Powertools) owns the output


def load_callable(spec: str, var: str) -> Callable[..., Any]:
    """Import ``module:function`` named by the environment variable ``var``; ConfigError
    naming the variable (at cold start, the cause chained) if it is not there or its
    import fails in any way."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"{var}={spec!r} must be module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    # Anything the import raises (a relative name, a syntax error, the module's own error,
    # even sys.exit) is the variable's fault, reported at cold start; not KeyboardInterrupt.
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{var}={spec!r} cannot be imported: {type(e).__name__}: {e}") from e
    if not callable(fn):
        raise ConfigError(f"{var}={spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def external_logging(on: bool) -> None:
    """Whether this library's log lines go to a logging setup of the caller's (Powertools'
    Logger) instead of its own JSON lines on stderr."""
    global _external_logging
    _external_logging = on


def setup_logging() -> None:
    """JSON lines on stderr for this library's handler logger (idempotent)."""
    if _external_logging:
        return
    if not any(isinstance(h.formatter, JsonFormatter) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def finish(
    config: LambdaConfig,
    outcome: BatchOutcome,
    context: LambdaContext,
    kind: str,
    fields: dict[str, Any],
    sqs: Callable[[], Any],
    metrics: MetricsSink | None = None,
) -> dict[str, Any]:
    """Release unprocessed messages if configured, log the summary, emit metrics, respond."""
    if outcome.unprocessed and config.release_unprocessed:
        # within what the invocation has left (a second kept to respond): past it Lambda
        # kills us before batchItemFailures is returned, and the whole batch comes back
        budget = Deadline.from_lambda_context(context, reserve=1.0)
        try:
            run_within(budget, "releasing unprocessed messages",
                       lambda: release(outcome.unprocessed, sqs()))  # fmt: skip
        except StorageTimeoutError:
            log.warning("releasing unprocessed messages: out of time; they come back when "
                        "their visibility timeout ends")  # fmt: skip
    summarize(config, outcome, context, kind, fields, metrics)
    return outcome.response()


def finish_cleanups(context: LambdaContext, most: float) -> None:
    """Wait, at most ``most`` seconds (the reserve) and within what the invocation has left
    (a second kept to respond), for the clean-ups its calls handed to the background (a
    lease's release after a deadline, a pin's removal): Lambda freezes the process once the
    handler returns, and a release left running then never ran, so the next compactors
    waited out the lease's ttl."""
    budget = Deadline.from_lambda_context(context, reserve=1.0)
    if not wait_for_cleanups(timeout=min(most, budget.remaining())):
        log.warning("clean-ups still running as the invocation ends: they resume, if at "
                    "all, when this container is next invoked")  # fmt: skip


def _request_id(context: object) -> str:
    try:  # the caller's object (a hand-made context may raise): the answer must go out
        return str(getattr(context, "aws_request_id", ""))
    except Exception:
        return ""


def summarize(
    config: LambdaConfig,
    outcome: BatchOutcome,
    context: LambdaContext,
    kind: str,
    fields: dict[str, Any],
    metrics: MetricsSink | None = None,
) -> None:
    """The batch's summary log line and its metrics (to ``metrics``, else as EMF on stdout
    when ``CHROMA_SNAPSHOTS_METRICS_NAMESPACE`` is set), once the clean-ups the batch left
    running are done (:func:`finish_cleanups`)."""
    finish_cleanups(context, config.reserve)
    summary = {
        "request_id": _request_id(context),
        "snapshot": config.name,
        "processed": len(outcome.processed),
        "unprocessed": len(outcome.unprocessed),
        "failed": len(outcome.failed) + len(outcome.poison),
        **fields,
    }
    log.info("%s batch done", kind, extra=summary)
    values = {
        "Processed": float(len(outcome.processed)),
        "Failed": float(summary["failed"]),
        "Unprocessed": float(len(outcome.unprocessed)),
        "Seconds": float(fields.get("seconds", 0.0)),
    }
    dimensions = {"Snapshot": config.name, "Handler": kind}
    if metrics is not None:
        metrics(values, dimensions)
    elif config.metrics_namespace:
        print(emf(config.metrics_namespace, values, dimensions))


class SqsHandler(ABC):
    """An SQS-batch Lambda handler: subclasses say how to process the good messages."""

    kind = "sqs"

    def __init__(self, config: LambdaConfig) -> None:
        self.config = config
        self.metrics_sink: MetricsSink | None = None  # e.g. use_powertools_metrics
        setup_logging()

    @classmethod
    def from_env(cls: type[H]) -> H:
        """Build from the environment (Lambda's init phase: bad config fails the cold start)."""
        return cls(LambdaConfig.from_env())

    @abstractmethod
    def work(self, messages: list[Message], deadline: Deadline, fields: dict[str, Any]) -> Results:
        """Process ``messages`` in order, yielding ``(message_id, error_or_None)``; put what the
        summary log line should show into ``fields``."""

    def __call__(self, event: Any, context: LambdaContext) -> dict[str, Any]:
        t0 = time.monotonic()
        fields: dict[str, Any] = {}
        outcome = run_batch(
            event, context, self.config.reserve, lambda msgs, dl: self.work(msgs, dl, fields)
        )
        fields["seconds"] = round(time.monotonic() - t0, 4)
        return finish(
            self.config, outcome, context, self.kind, fields, self._sqs, self.metrics_sink
        )

    def _sqs(self) -> Any:
        import boto3

        return boto3.client("sqs")
