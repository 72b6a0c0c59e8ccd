"""The compaction handler: deltas from SQS merged into the snapshot with ``compaction.compact``.

Every well-formed message of a batch is one delta (``Delta.from_obj``: id, collection,
upserts, deletes); they are compacted together under the configured lease lock, so a
batch costs one publish. Malformed messages, and deltas chroma would refuse (checked
first, isolated if chroma raises anyway), fail alone as poison; if the compaction itself
fails, the batch's deltas are reported as failures and come back.
"""

from __future__ import annotations

from typing import Any

from chroma_snapshots.aws_lambda.batch import Message
from chroma_snapshots.aws_lambda.common import Results, SqsHandler
from chroma_snapshots.compaction import Delta, compact
from chroma_snapshots.config import LambdaConfig
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.errors import InvalidInputError
from chroma_snapshots.locking import DynamoDBLeaseLock, LeaseLock, ObjectLeaseLock
from chroma_snapshots.opening import open_store, remote_for
from chroma_snapshots.stores.base import SnapshotStore


def lock_from_config(config: LambdaConfig) -> LeaseLock | None:
    """The lease lock the configuration names: a DynamoDB table or an object in the store."""
    if config.lock_table:
        import boto3

        client = boto3.client("dynamodb")  # botocore honours AWS_ENDPOINT_URL_DYNAMODB
        return DynamoDBLeaseLock(client, config.lock_table, f"compact:{config.name}")
    if config.lock_key:
        return ObjectLeaseLock(remote_for(config.store, config.store.url).backend, config.lock_key)
    return None


class CompactionHandler(SqsHandler):
    """The handler object; build it once per container (cold start)."""

    kind = "compaction"

    def __init__(
        self,
        config: LambdaConfig,
        *,
        store: SnapshotStore | None = None,
        lock: LeaseLock | None = None,
    ) -> None:
        super().__init__(config)
        self.store = store or open_store(config.store)
        self.lock = lock if lock is not None else lock_from_config(config)

    def work(self, messages: list[Message], deadline: Deadline, fields: dict[str, Any]) -> Results:
        deltas: list[tuple[str, Delta]] = []
        for m in messages:
            try:
                deltas.append((m.message_id, Delta.from_obj(m.body)))
            except Exception as e:  # poison: fails alone
                yield m.message_id, e
        if not deltas:
            return
        try:
            result = compact(
                self.store,
                self.config.name,
                [d for _, d in deltas],
                lock=self.lock,
                deadline=deadline,
            )
        except Exception as e:  # the whole batch comes back for a retry
            yield from ((mid, e) for mid, _ in deltas)
            return
        fields.update(
            version=result.info.version if result.info else None,
            base=result.base,
            applied=list(result.applied),
            skipped=list(result.skipped),
            rejected=sorted(result.rejected),
            attempts=result.attempts,
        )
        for mid, d in deltas:
            reason = result.rejected.get(d.id)
            # a rejected delta fails alone, as poison: chroma refuses it on every delivery
            yield mid, None if reason is None else InvalidInputError(f"delta {d.id}: {reason}")


def __getattr__(name: str) -> Any:
    # Built when Lambda resolves the handler during init: bad configuration fails the cold start.
    if name == "handler":
        globals()["handler"] = CompactionHandler.from_env()
        return globals()["handler"]
    raise AttributeError(name)
