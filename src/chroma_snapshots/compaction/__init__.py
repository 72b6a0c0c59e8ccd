"""Compaction: merge deltas into the latest snapshot under optimistic concurrency.

``compact`` checks out the latest version, applies deltas (upserts and deletes, given as
records or read from a delta snapshot with ``snapshot_deltas``) with chroma, and
publishes with ``expected=<the version it started from>``; if another compactor
published first, it starts again from the new latest. Every applied delta id
is recorded in the manifest, so a redelivered delta (an SQS retry) is skipped rather
than applied again over newer data. A lease lock only saves wasted work; it is renewed
while the work goes on.

- :mod:`~chroma_snapshots.compaction.deltas`: ``Delta``/``Record`` and chroma's rules,
  checked before anything is applied (no chromadb import);
- :mod:`~chroma_snapshots.compaction.merge`: ``compact``, isolating a delta chroma refuses.
"""

from chroma_snapshots.compaction.deltas import (
    Delta,
    Record,
    dimension_problem,
    embedding_problem,
    problem,
)
from chroma_snapshots.compaction.merge import (
    MAX_APPLIED,
    CompactionResult,
    applied_ids,
    compact,
    snapshot_deltas,
)

__all__ = [
    "MAX_APPLIED",
    "CompactionResult",
    "Delta",
    "Record",
    "applied_ids",
    "compact",
    "dimension_problem",
    "embedding_problem",
    "problem",
    "snapshot_deltas",
]
