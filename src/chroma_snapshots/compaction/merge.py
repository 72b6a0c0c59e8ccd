"""Compaction: merge deltas into the latest snapshot under optimistic concurrency.

``compact`` checks out the latest version, applies deltas (upserts and deletes, given as
records or read from a delta snapshot with ``snapshot_deltas``) with chroma, and
publishes with ``expected=<the version it started from>``; if another compactor
published first, it starts again from the new latest. Every applied delta id
is recorded in the manifest, so a redelivered delta (an SQS retry) is skipped rather
than applied again over newer data. A lease lock only saves wasted work.
"""

from __future__ import annotations

import math
import sqlite3
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import chromadb

from chroma_snapshots.chroma import client_settings, close_client, open_client, publish_client
from chroma_snapshots.engine.deadline import DeadlineLike, as_deadline
from chroma_snapshots.engine.models import SnapshotInfo
from chroma_snapshots.errors import ConflictError, InvalidInputError, SnapshotNotFoundError
from chroma_snapshots.locking import LeaseLock
from chroma_snapshots.stores.base import SnapshotStore

MAX_APPLIED = 10_000  # delta ids remembered in the manifest (older ones can't be redelivered)


@dataclass(frozen=True)
class Record:
    """One record to upsert: id, embedding, and optional document and metadata."""

    id: str
    embedding: tuple[float, ...]
    document: str | None = None
    metadata: Mapping[str, str | int | float | bool] | None = None


@dataclass(frozen=True)
class Delta:
    """A unit of work for one collection, identified by ``id`` for idempotence."""

    id: str
    collection: str
    upserts: tuple[Record, ...] = ()
    deletes: tuple[str, ...] = ()

    @classmethod
    def from_obj(cls, obj: object) -> Delta:
        """Parse a delta from decoded JSON (an SQS message body); InvalidInputError if malformed."""
        try:
            assert isinstance(obj, dict)
            upserts = tuple(_record(r) for r in obj.get("upserts", []))
            deletes = tuple(str(i) for i in obj.get("deletes", []))
            delta = cls(str(obj["id"]), str(obj["collection"]), upserts, deletes)
        except (AssertionError, KeyError, TypeError, ValueError) as e:
            raise InvalidInputError(f"malformed delta: {e!r}") from e
        if not delta.id or not delta.collection:
            raise InvalidInputError("a delta needs an id and a collection")
        return delta


def _record(r: Any) -> Record:
    emb = tuple(float(x) for x in r["embedding"])
    if not emb or not all(math.isfinite(x) for x in emb):
        raise ValueError("embedding must be a non-empty list of finite numbers")
    meta = r.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError("metadata must be an object")
    return Record(str(r["id"]), emb, r.get("document"), meta)


@dataclass(frozen=True)
class CompactionResult:
    """What ``compact`` did: the version it published (None if nothing was new)."""

    info: SnapshotInfo | None
    applied: tuple[str, ...]
    skipped: tuple[str, ...]
    attempts: int
    fence: int | None = None
    conflicts: list[str] = field(default_factory=list)


def snapshot_deltas(
    store: SnapshotStore, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
) -> list[Delta]:
    """Deltas from a published delta snapshot: a small chroma database published under its own
    name (e.g. by an upload worker). One delta per collection upserts every record; its id
    names the exact version, so compacting the same delta snapshot twice is a no-op."""
    version = store.resolve(name, ref, deadline=deadline).version
    out = []
    with open_client(store, name, version, deadline=deadline) as client:
        for col in client.list_collections():
            got = col.get(include=cast(Any, ["embeddings", "documents", "metadatas"]))
            records = tuple(
                Record(i, tuple(float(x) for x in e), d, m or None)
                for i, e, d, m in zip(
                    got["ids"], got["embeddings"], got["documents"], got["metadatas"], strict=True
                )
            )
            out.append(Delta(f"snapshot:{name}@{version}:{col.name}", col.name, records))
    return out


def applied_ids(info: SnapshotInfo | None) -> list[str]:
    """Delta ids recorded in a version's manifest."""
    if info is None:
        return []
    comp = info.metadata.get("compaction")
    return [str(x) for x in comp.get("applied", [])] if isinstance(comp, dict) else []


def compact(
    store: SnapshotStore,
    name: str,
    deltas: Sequence[Delta],
    *,
    lock: LeaseLock | None = None,
    max_retries: int = 10,
    lock_timeout: float = 60.0,
    vacuum: bool = False,
    deadline: DeadlineLike = None,
) -> CompactionResult:
    """Apply ``deltas`` to the latest version of ``name`` and publish the result (CAS).

    ``vacuum`` rewrites ``chroma.sqlite3`` compactly before publishing: about 20% smaller,
    but every page moves, so that version costs readers a near-full download of the sqlite
    file. Leave it off for routine compactions (docs/CHROMA.md has the measurements).
    """
    dl = as_deadline(deadline, 900.0)
    conflicts: list[str] = []
    for attempt in range(1, max_retries + 1):
        lease = lock.acquire(timeout=min(lock_timeout, dl.remaining())) if lock else None
        try:
            fence = lease.generation if lease else None
            return _attempt(store, name, deltas, attempt, fence, dl, conflicts, vacuum)
        except ConflictError as e:
            conflicts.append(str(e))
        finally:
            if lock is not None and lease is not None:
                lock.release(lease)
    raise ConflictError(f"compaction of {name} lost {max_retries} races in a row: {conflicts[-1]}")


def _attempt(
    store: SnapshotStore,
    name: str,
    deltas: Sequence[Delta],
    attempt: int,
    fence: int | None,
    dl: Any,
    conflicts: list[str],
    vacuum: bool,
) -> CompactionResult:
    try:
        base: SnapshotInfo | None = store.resolve(name, deadline=dl)
    except SnapshotNotFoundError:
        base = None
    done = applied_ids(base)
    todo = [d for d in deltas if d.id not in set(done)]
    skipped = tuple(d.id for d in deltas if d.id in set(done))
    if not todo:
        return CompactionResult(None, (), skipped, attempt, fence, conflicts)
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-compact-") as tmp:
        db = Path(tmp) / "db"
        if base is not None:
            store.checkout(name, base.version, db, deadline=dl)
        _apply(db, todo)
        if vacuum:
            _vacuum(db / "chroma.sqlite3")
        meta = {
            "compaction": {"applied": (done + [d.id for d in todo])[-MAX_APPLIED:], "fence": fence}
        }
        info = publish_client(
            store,
            name,
            db,
            expected=base.version if base else None,
            metadata=meta,
            deadline=dl,
            message=f"compacted {len(todo)} deltas",
        )
    return CompactionResult(info, tuple(d.id for d in todo), skipped, attempt, fence, conflicts)


def _vacuum(sqlite_file: Path) -> None:
    db = sqlite3.connect(sqlite_file)
    try:
        db.execute("VACUUM")
    finally:
        db.close()


def _apply(db: Path, deltas: Sequence[Delta]) -> None:
    client = chromadb.PersistentClient(path=str(db), settings=client_settings())
    try:
        for d in deltas:
            col = client.get_or_create_collection(d.collection, embedding_function=None)
            if d.upserts:
                col.upsert(
                    ids=[r.id for r in d.upserts],
                    embeddings=cast(Any, [list(r.embedding) for r in d.upserts]),
                    documents=[r.document or "" for r in d.upserts],
                    metadatas=cast(
                        Any, [dict(r.metadata) if r.metadata else None for r in d.upserts]
                    ),
                )
            if d.deletes:
                col.delete(ids=list(d.deletes))
    finally:
        close_client(client)
