"""The query (reader) handler: nearest neighbours for SQS messages, from the latest snapshot.

The client on the latest version is opened through the /tmp cache and kept open across
warm invocations (each pays one small request: the ref); a new version is checked out
incrementally and the old client closed. Every message runs through the processing
function, and each result goes to the sink. Message body::

    {"collection": "receipts", "query_embeddings": [[...]] | "ids": ["..."],
     "n_results": 10, "where": {...}}
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from chroma_snapshots.aws_lambda.batch import Message, log
from chroma_snapshots.aws_lambda.common import Results, SqsHandler, load_callable
from chroma_snapshots.chroma import open_checkout
from chroma_snapshots.compaction.deltas import embedding_problem
from chroma_snapshots.config import ENV_PROCESSOR, ENV_SINK, LambdaConfig
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.models import TransferStats
from chroma_snapshots.errors import InvalidInputError
from chroma_snapshots.opening import open_store
from chroma_snapshots.stores.base import LocalSnapshot, SnapshotStore

# Results one message may ask for, all its queries together: chroma holds every candidate
# of every query at once, and 2,000 queries of n_results=1,000 in one 84 KB message took
# 1.4 GiB before failing (a Lambda of 1 GiB is killed, with the rest of its batch).
MAX_RESULTS = 1000
# Bytes of documents and metadata one message's answer may carry (Lambda's own limit on a
# response): they are read in pages against it, since 1,000 results of 100 KB documents
# took a reader to 697 MiB (chroma holds the query's whole answer, then the sink its copy).
MAX_RESULT_BYTES = 6 << 20
_PAGE = 100  # results whose documents and metadata are read at once


def default_query(client: Any, body: Any) -> dict[str, Any]:
    """Run one query message against ``client``; InvalidInputError if the message is
    malformed or asks for more than MAX_RESULTS results (queries x ``n_results``)."""
    if not isinstance(body, dict) or not isinstance(body.get("collection"), str):
        raise InvalidInputError("a query needs a 'collection'")
    n = body.get("n_results", 10)
    if type(n) is not int or not 1 <= n <= MAX_RESULTS:
        raise InvalidInputError(f"n_results must be an integer from 1 to {MAX_RESULTS}")
    asked = body.get("query_embeddings", body.get("ids"))
    if isinstance(asked, list) and len(asked) * n > MAX_RESULTS:
        raise InvalidInputError(
            f"{len(asked)} queries of n_results={n} ask for {len(asked) * n} results; "
            f"a message may ask for at most {MAX_RESULTS} (split it)"
        )
    where = body.get("where")
    if where is not None and not isinstance(where, dict):
        raise InvalidInputError("where must be an object")
    col = client.get_collection(body["collection"])
    include = ["distances"]  # documents and metadata after, within MAX_RESULT_BYTES
    if "query_embeddings" in body:
        emb = body["query_embeddings"]
        if not isinstance(emb, list) or not emb or not all(isinstance(v, list) and v for v in emb):
            raise InvalidInputError("query_embeddings must be a non-empty list of vectors")
        for i, vector in enumerate(emb):
            bad = embedding_problem(vector, f"query_embeddings[{i}]")
            if bad is not None:
                raise InvalidInputError(bad)
        res = col.query(query_embeddings=emb, n_results=n, where=where, include=include)
    elif isinstance(body.get("ids"), list):
        stored = col.get(ids=[str(i) for i in body["ids"]], include=["embeddings"])
        if not stored["ids"]:
            return {"ids": [], "distances": [], "documents": [], "metadatas": []}
        res = col.query(
            query_embeddings=stored["embeddings"], n_results=n, where=where, include=include
        )
    else:
        raise InvalidInputError("a query needs 'query_embeddings' or 'ids'")
    documents, metadatas = _contents(col, res["ids"])
    return {"ids": res["ids"], "distances": res["distances"], "documents": documents,
            "metadatas": metadatas}  # fmt: skip


def _contents(col: Any, found: list[list[str]]) -> tuple[list[list[Any]], list[list[Any]]]:
    """The documents and metadata of the ``found`` ids (per query), read ``_PAGE`` records
    at a time; InvalidInputError as soon as they come to more than MAX_RESULT_BYTES."""
    wanted = list(dict.fromkeys(i for ids in found for i in ids))
    got: dict[str, tuple[Any, Any]] = {}
    size = 0
    for lo in range(0, len(wanted), _PAGE):
        page = col.get(ids=wanted[lo : lo + _PAGE], include=["documents", "metadatas"])
        n = len(page["ids"])
        docs, metas = page["documents"] or [None] * n, page["metadatas"] or [None] * n
        for i, doc, meta in zip(page["ids"], docs, metas, strict=True):
            size += len((doc or "").encode()) + len(json.dumps(meta, default=str))
            got[i] = (doc, meta)
        if size > MAX_RESULT_BYTES:
            raise InvalidInputError(
                f"the results' documents and metadata come to more than {MAX_RESULT_BYTES} "
                f"bytes (past {min(lo + _PAGE, len(wanted))} of {len(wanted)} records): "
                "ask for fewer results (n_results, or fewer queries a message)"
            )
    return ([[got[i][0] for i in ids] for ids in found],
            [[got[i][1] for i in ids] for ids in found])  # fmt: skip


def warm_up(client: Any) -> None:
    """Load each collection's vector index (chroma reads it on the first query), with one
    query by a stored vector: the first real query then does not pay it."""
    for col in client.list_collections():
        sample = col.get(limit=1, include=["embeddings"])
        if sample["ids"]:
            col.query(query_embeddings=[sample["embeddings"][0]], n_results=1, include=[])


def log_results(message: Message, result: Any) -> None:
    """The default sink: one JSON log line per message."""
    log.info("query result", extra={"message_id": message.message_id, "result": result})


class QueryHandler(SqsHandler):
    """The handler object; build it once per container (cold start)."""

    kind = "query"

    def __init__(self, config: LambdaConfig, *, store: SnapshotStore | None = None) -> None:
        super().__init__(config)
        self.store = store or open_store(config.store)
        self.process = (
            load_callable(config.processor, ENV_PROCESSOR) if config.processor else default_query
        )
        self.sink = load_callable(config.sink, ENV_SINK) if config.sink else log_results
        self._open: tuple[str, Any, LocalSnapshot, ExitStack] | None = None

    def work(self, messages: list[Message], deadline: Deadline, fields: dict[str, Any]) -> Results:
        try:
            client, snap = self._client(deadline)
        except Exception as e:  # no snapshot: every message fails and is retried
            yield from ((m.message_id, e) for m in messages)
            return
        fields.update(
            version=snap.info.version,
            source=snap.source,
            stale=snap.stale,
            bytes_downloaded=snap.stats.bytes_downloaded,
            requests=snap.stats.requests,
        )
        if snap.stale:  # CHROMA_SNAPSHOTS_STALE_OK and the store did not answer
            log.warning(
                "serving a stale version: the store did not answer",
                extra={"snapshot": self.config.name, "version": snap.info.version, "stale": True},
            )
        for m in messages:
            if deadline.expired():
                return
            try:
                self.sink(m, self.process(client, m.body))
                yield m.message_id, None
            except Exception as e:  # one bad message never fails the batch
                yield m.message_id, e

    def _client(self, deadline: Deadline) -> tuple[Any, LocalSnapshot]:
        """The client on the latest version, kept open across warm invocations.

        Chroma writes to a database it opens (it replays its write-ahead log into the
        vector index and persists it on close, even for reads), so reopening per request
        would both pay the replay every time and dirty the cached copy. One small request
        (the ref; none within the store's read-consistency interval) tells whether the open
        client is still on the latest version.
        """
        # Within CHROMA_SNAPSHOTS_REFRESH_SECONDS of the last read, the ref is not read again.
        requests = 0 if self.store.recent_ref(self.config.name, "latest") else 1
        version, stale = self.store.current_version(self.config.name, deadline=deadline)
        if self._open is not None and self._open[0] == version:
            snap = self._open[2]
            stats = TransferStats(requests=requests)
            return self._open[1], replace(snap, stats=stats, stale=stale, source="cache")
        self.close()
        stack = ExitStack()
        client, snap = stack.enter_context(
            open_checkout(self.store, self.config.name, version, deadline=deadline)
        )
        self._open = (snap.info.version, client, snap, stack)
        return client, snap

    def hydrate(self, budget: float) -> bool:
        """Check the latest version out, open the client and load its vector indexes now,
        within ``budget`` seconds: during Lambda's init phase, so the first invocation does
        not pay it. False (logged) if it did not finish: the first invocation then does it
        (an unfinished materialization is discarded). The budget starts now, after the
        imports: Lambda's 10 s init limit counts both."""
        t0 = time.monotonic()
        try:
            client, snap = self._client(Deadline(budget))
            warm_up(client)
        except Exception as e:  # the first invocation tries again, with its own deadline
            log.warning(
                "init-phase checkout did not finish: %s: %s",
                type(e).__name__,
                e,
                extra={"snapshot": self.config.name, "seconds": round(time.monotonic() - t0, 4)},
            )
            return False
        log.info(
            "init-phase checkout done",
            extra={
                "snapshot": self.config.name,
                "version": snap.info.version,
                "source": snap.source,
                "bytes_downloaded": snap.stats.bytes_downloaded,
                "seconds": round(time.monotonic() - t0, 4),
            },
        )
        return True

    def close(self) -> None:
        """Close the open client (a new version, or the end of the container)."""
        if self._open is not None:
            self._open[3].close()
            self._open = None


def __getattr__(name: str) -> Any:
    # Lambda resolves "chroma_snapshots.aws_lambda.query.handler" during init: the handler is
    # built then, so a bad configuration fails the cold start, not each message.
    if name == "handler":
        handler = QueryHandler.from_env()
        if handler.config.init_seconds > 0:  # CHROMA_SNAPSHOTS_INIT_SECONDS
            handler.hydrate(handler.config.init_seconds)
        globals()["handler"] = handler
        return handler
    raise AttributeError(name)
