"""``compact``: apply deltas to the latest version and publish with compare-and-swap.

A delta chroma would refuse is rejected alone (``CompactionResult.rejected``), never the
batch: deltas are checked against chroma's rules and each collection's dimension first,
and if chroma still raises, the delta it raised on is set aside and the others are
applied again to a fresh copy of the base.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import chromadb
import chromadb.errors

from chroma_snapshots.chroma import (
    client_settings,
    close_client,
    collection_dimensions,
    open_client,
    publish_client,
)
from chroma_snapshots.compaction.deltas import Delta, Record, dimension_problem, problem
from chroma_snapshots.engine.deadline import Deadline, DeadlineLike, as_deadline
from chroma_snapshots.engine.folders import remove_tree
from chroma_snapshots.engine.models import SnapshotInfo
from chroma_snapshots.engine.retry import RetryPolicy
from chroma_snapshots.engine.scratch import scratch_dir
from chroma_snapshots.errors import ConflictError, IntegrityError, SnapshotNotFoundError
from chroma_snapshots.locking import LeaseLock
from chroma_snapshots.stores.base import SnapshotStore

log = logging.getLogger(__name__)
MAX_APPLIED = 10_000  # delta ids remembered in the manifest (older ones can't be redelivered)


@dataclass(frozen=True)
class CompactionResult:
    """What ``compact`` did: the version it published (None if nothing was new), the base
    version it applied the deltas to (``applied`` deltas' idempotency key is their id plus
    this base), and the deltas chroma would refuse, with the reason (never applied)."""

    info: SnapshotInfo | None
    applied: tuple[str, ...]
    skipped: tuple[str, ...]
    attempts: int
    fence: int | None = None
    conflicts: list[str] = field(default_factory=list)
    rejected: Mapping[str, str] = field(default_factory=dict)
    base: str | None = None


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
    """Delta ids recorded in a version's manifest (none recorded: empty); IntegrityError
    if its ``compaction.applied`` is not a list of ids (a dict's keys, or a string's
    characters, taken for ids would skip deltas never applied)."""
    comp = None if info is None else info.metadata.get("compaction")
    if comp is None:
        return []
    got = comp.get("applied", []) if isinstance(comp, dict) else None
    if not isinstance(got, list) or not all(isinstance(x, str) for x in got):
        raise IntegrityError(
            f"version {info.version if info else ''}: its metadata 'compaction' is not "
            '{"applied": [delta ids, ...]}: which deltas it holds is unknown, so none can '
            "be applied to it; publish a version whose metadata has a valid list"
        )
    return got


def _applied_before(store: SnapshotStore, name: str, base: SnapshotInfo, dl: Deadline) -> list[str]:
    """The delta ids ``base`` holds: its own record, or, if it has none (a version
    published by hand on top of a compaction's), its nearest ancestor's within LOOKBACK
    versions (a redelivered delta must not be applied again because of it)."""
    info = base
    for _ in range(LOOKBACK):
        if "compaction" in info.metadata or info.parent is None:
            break
        try:
            info = store.resolve(name, info.parent, deadline=dl)
        except SnapshotNotFoundError:  # pruned: nothing older to go by
            break
    return applied_ids(info)


# Versions without a compaction record looked through for one (each one or two requests).
LOOKBACK = 20


CONFLICT_RETRY = RetryPolicy(base=0.05, cap=2.0)
"""After a lost compare-and-swap: back off with jitter, so compactors that lost the same race
do not all load, merge and publish again in step."""


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

    Deltas already applied (their ids are in the latest manifest) are ``skipped``; deltas
    chroma would refuse are not applied and are reported in ``rejected`` with the reason,
    the others are published without them.

    With ``lock``, each attempt holds the lease, renews it while it works (until the
    deadline) and releases it after; a release that fails (the lease lapsed and was taken
    over) is logged, never raised: the publish, if it happened, stands.

    ``vacuum`` rewrites ``chroma.sqlite3`` compactly before publishing: about 20% smaller,
    but every page moves, so that version costs readers a near-full download of the sqlite
    file. Leave it off for routine compactions (docs/CHROMA.md has the measurements).
    """
    dl = as_deadline(deadline, 900.0)
    conflicts: list[str] = []
    _warn_same_id(deltas)

    def attempt(n: int) -> CompactionResult:
        lease = lock.acquire(timeout=min(lock_timeout, dl.remaining())) if lock else None
        fence = lease.generation if lease else None
        if lock is None or lease is None:
            return _attempt(store, name, deltas, n, fence, dl, conflicts, vacuum)
        with lock.kept(lease, remaining=dl.remaining):
            return _attempt(store, name, deltas, n, fence, dl, conflicts, vacuum)

    policy = CONFLICT_RETRY.with_(attempts=max_retries)
    try:
        return policy.call(
            attempt,
            retry_on=(ConflictError,),
            within=dl.remaining(),
            on_retry=lambda _, e: conflicts.append(str(e)),
        )
    except ConflictError as e:
        conflicts.append(str(e))
        raise ConflictError(
            f"compaction of {name} lost {len(conflicts)} races in a row: {e}"
        ) from e


def _attempt(
    store: SnapshotStore,
    name: str,
    deltas: Sequence[Delta],
    attempt: int,
    fence: int | None,
    dl: Deadline,
    conflicts: list[str],
    vacuum: bool,
) -> CompactionResult:
    try:
        base: SnapshotInfo | None = store.resolve(name, deadline=dl)
    except SnapshotNotFoundError:
        base = None
    done = [] if base is None else _applied_before(store, name, base, dl)
    seen = set(done)
    skipped = tuple(d.id for d in deltas if d.id in seen)
    rejected: dict[str, str] = {}
    fresh = []
    for d in deltas:  # once per id, in order: SQS may deliver a message twice in a batch
        if d.id not in seen:
            seen.add(d.id)
            fresh.append(d)
    todo = _checked(fresh, rejected)
    base_version = base.version if base else None

    def result(info: SnapshotInfo | None, applied: Sequence[Delta]) -> CompactionResult:
        ids = tuple(d.id for d in applied)
        return CompactionResult(
            info, ids, skipped, attempt, fence, conflicts, rejected, base_version
        )

    if not todo:
        return result(None, ())
    with scratch_dir("chroma-snapshots-compact-", "making a folder for the compaction") as tmp:
        db = Path(tmp) / "db"
        todo = _apply_isolated(store, name, base_version, db, todo, rejected, dl)
        if not todo:
            return result(None, ())
        if vacuum:
            _vacuum(db / "chroma.sqlite3")
        applied = (done + [d.id for d in todo])[-MAX_APPLIED:]
        info = publish_client(
            store,
            name,
            db,
            expected=base_version,
            metadata={"compaction": {"applied": applied, "fence": fence}},
            deadline=dl,
            message=f"compacted {len(todo)} deltas",
        )
    return result(info, todo)


def _warn_same_id(deltas: Sequence[Delta]) -> None:
    """Log a warning for each id that two deltas of the batch share with different content:
    only the first is applied (a delta id is its idempotency key), so the other's content
    is dropped, which a producer reusing ids would not expect. Only deltas whose id comes
    twice are compared: the comparison reads every record, before the deadline is ever
    looked at (a review's batch of 10,000 records of 384 floats spent 9.7 s here)."""
    kept = [d for d in deltas if _hashable(d.id)]  # a Delta built by hand: no warning
    twice = {i for i, n in Counter(d.id for d in kept).items() if n > 1}
    first: dict[object, str] = {}
    for d in kept:
        if d.id in twice:
            content = _content(d)
            if first.setdefault(d.id, content) != content:
                log.warning(
                    "delta %r appears twice with different content: the later is dropped", d.id
                )


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _content(d: Delta) -> str:
    # JSON text, not ==: NaN in metadata is never equal to itself
    try:
        return json.dumps(asdict(d), sort_keys=True, default=repr)
    except Exception:  # a warning must never fail the batch
        return repr(d)


def _checked(deltas: list[Delta], rejected: dict[str, str]) -> list[Delta]:
    """The deltas chroma's rules accept; the others go to ``rejected`` with the reason."""
    ok = []
    for d in deltas:
        try:
            bad = problem(d)
        except Exception as e:  # a Delta built by hand with values of the wrong types
            bad = f"cannot be checked: {type(e).__name__}: {e}"
        if bad is None:
            ok.append(d)
        else:
            _reject(d, bad, rejected)
    return ok


def _reject(delta: Delta, reason: str, rejected: dict[str, str]) -> None:
    log.warning("delta %s rejected: %s", delta.id, reason)
    rejected[delta.id] = reason


def _checkout(store: SnapshotStore, name: str, base: str | None, db: Path, dl: Deadline) -> None:
    remove_tree(db)
    if base is not None:
        store.checkout(name, base, db, deadline=dl)


def _apply_isolated(
    store: SnapshotStore,
    name: str,
    base: str | None,
    db: Path,
    todo: list[Delta],
    rejected: dict[str, str],
    dl: Deadline,
) -> list[Delta]:
    """Check out ``base`` at ``db`` and apply ``todo``; return the deltas applied.

    A delta whose embeddings do not fit its collection's dimension is rejected; a new
    collection's dimension is set by the first delta actually applied to it (as chroma
    does), not by one chroma then refuses. If chroma refuses a delta (or applying it
    raises anything else that is not the disk's or chroma's own failure), that delta is
    rejected and the others are applied again to a fresh checkout (the refused one may
    have been half applied): each round removes one delta, so this ends, and a good delta
    is never refused for a bad one."""
    _checkout(store, name, base, db, dl)
    dims = collection_dimensions(db) if base else {}
    while True:
        applied, failed = _apply(db, todo, dims, rejected, dl)
        if failed is None:
            return applied
        index, error = failed
        _reject(todo[index], _refusal(error), rejected)
        # the deltas before it were applied in this order and fare the same again; those
        # after it were not looked at yet
        todo = applied + todo[index + 1 :]
        _checkout(store, name, base, db, dl)


def _vacuum(sqlite_file: Path) -> None:
    db = sqlite3.connect(sqlite_file)
    try:
        db.execute("VACUUM")
    finally:
        db.close()


def _apply(
    db: Path,
    deltas: Sequence[Delta],
    dims: Mapping[str, int | None],
    rejected: dict[str, str],
    dl: Deadline,
) -> tuple[list[Delta], tuple[int, Exception] | None]:
    """Apply ``deltas`` in order, rejecting those that do not fit their collection's
    dimension (``dims``: the base's, then set by the first delta applied to a new
    collection); the deltas applied, and the index of the first one chroma refused
    and why (the deltas after it are not looked at). StorageTimeoutError once ``dl``
    passes, looked at before every call to chroma (none can be interrupted)."""
    dims = dict(dims)
    applied: list[Delta] = []
    client = chromadb.PersistentClient(path=str(db), settings=client_settings())
    try:
        for i, d in enumerate(deltas):
            dl.check("applying the deltas")
            bad = dimension_problem(d, dims.get(d.collection))
            if bad is not None:
                _reject(d, bad, rejected)
                continue
            try:
                _apply_one(client, d, partial(dl.check, "applying the deltas"))
            except Exception as e:
                if not _refused(e):
                    raise
                return applied, (i, e)
            if d.upserts and dims.get(d.collection) is None:
                dims[d.collection] = len(d.upserts[0].embedding)
            applied.append(d)
    finally:
        close_client(client)
    return applied, None


def _apply_one(client: Any, d: Delta, check: Callable[[], None]) -> None:
    """Apply one delta, its upserts and deletes in calls of at most CALL_RECORDS (a delta
    of more upserts than one call of chroma's takes is valid: chroma raised InternalError
    on it, which failed the whole batch), ``check()`` before each. A call that fails leaves
    the delta half applied; the caller then starts again from a fresh checkout without it."""
    col = client.get_or_create_collection(d.collection, embedding_function=None)
    step = min(client.get_max_batch_size(), CALL_RECORDS)
    # A record without a document keeps the one stored (as chroma's upsert does): an
    # embedding's refresh must not wipe it. Apart from the others: chroma takes a list of
    # documents or none. A delta's ids are unique, so the order of the two calls is free.
    with_doc = [r for r in d.upserts if r.document is not None]
    no_doc = [r for r in d.upserts if r.document is None]
    for records, docs in ((with_doc, True), (no_doc, False)):
        for k in range(0, len(records), step):
            check()
            part = records[k : k + step]
            col.upsert(
                ids=[r.id for r in part],
                embeddings=cast(Any, [list(r.embedding) for r in part]),
                documents=[cast(str, r.document) for r in part] if docs else None,
                metadatas=cast(Any, [dict(r.metadata) if r.metadata else None for r in part]),
            )
    for k in range(0, len(d.deletes), step):
        check()
        col.delete(ids=list(d.deletes[k : k + step]))


# Records one call to chroma applies: no call can be interrupted, so this bounds how far
# past its deadline a compaction runs (10 deltas of 5,000 upserts, each one call, ran 16 s
# past a 4 s budget in a review).
CALL_RECORDS = 1000


def _refusal(e: Exception) -> str:
    chroma = isinstance(e, (ValueError, TypeError, chromadb.errors.ChromaError))
    return f"{'chroma refused it' if chroma else 'applying it failed'}: {type(e).__name__}: {e}"


def _refused(e: Exception) -> bool:
    """Whether applying a delta failed for its content (its fault: chroma refused it, or
    anything else raised while it was applied), not for the disk, memory or chroma itself
    (no other delta would fare better: the whole attempt fails)."""
    return not isinstance(e, (OSError, MemoryError, chromadb.errors.InternalError))
