"""A stand-in for the Lambda context object, for running handlers outside Lambda."""

from __future__ import annotations

import time
import uuid


class FakeContext:
    """Has what the handlers read: ``aws_request_id`` and ``get_remaining_time_in_millis``,
    counting down from ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.aws_request_id = uuid.uuid4().hex
        self._end = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self._end - time.monotonic()) * 1000)
