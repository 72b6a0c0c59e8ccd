"""Plug-ins the handler tests configure as module:function (a sink and a slow processor)."""

from __future__ import annotations

import time
from typing import Any

from chroma_snapshots.aws_lambda.batch import Message
from chroma_snapshots.aws_lambda.query import default_query

RESULTS: dict[str, Any] = {}


def collect(message: Message, result: Any) -> None:
    RESULTS[message.message_id] = result


def slow_query(client: Any, body: Any) -> Any:
    time.sleep(0.3)
    return default_query(client, body)
