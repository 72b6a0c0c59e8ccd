"""ChromaDB integration (extra ``chroma``): the only package that imports chromadb.

- :func:`open_client` checks a version out (through the cache when the store has one)
  and yields a ``chromadb.PersistentClient`` on it; on exit the client is closed and
  evicted from chroma's process-wide system cache, so a later open never reuses a stale
  HNSW index or sqlite handle.
- :func:`publish_client` publishes a live database safely: the client is closed first
  (chroma flushes on stop), the segment files are copied, then ``chroma.sqlite3`` through
  SQLite's online backup API (a consistent image even while another process writes), and
  the copy is validated before a byte is uploaded.
- :func:`validate` says whether a directory is a chroma database chroma can open, with
  per-collection record counts; chroma opens it in a child process, so a crash of its
  native code on a damaged folder is an IntegrityError, not the caller's death.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chromadb

from chroma_snapshots.chroma.client import SQLITE, client_folder
from chroma_snapshots.chroma.client import client_settings as client_settings
from chroma_snapshots.chroma.client import close_client as close_client
from chroma_snapshots.engine.apart import published_from
from chroma_snapshots.engine.child import ChildFailed, run_once
from chroma_snapshots.engine.deadline import MAX_SECONDS, Deadline, DeadlineLike, as_deadline
from chroma_snapshots.engine.folders import remove_tree
from chroma_snapshots.engine.localfs import copy_tree
from chroma_snapshots.engine.models import SnapshotInfo
from chroma_snapshots.engine.placer import disk_error
from chroma_snapshots.engine.retry import IMMEDIATE
from chroma_snapshots.engine.scratch import scratch_dir
from chroma_snapshots.engine.validation import path_text
from chroma_snapshots.errors import IntegrityError, InvalidInputError, SnapshotError, shown
from chroma_snapshots.stores.base import LATEST, Expected, LocalSnapshot, SnapshotStore

_PROBE = "chroma_snapshots.chroma.probe:main"  # chroma's half of validate, in a child
_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL, named there from Python 3.11
_COUNTS = """
    SELECT c.name, COUNT(e.id) FROM collections c
    LEFT JOIN segments s ON s.collection = c.id AND s.scope = 'METADATA'
    LEFT JOIN embeddings e ON e.segment_id = s.id
    GROUP BY c.name ORDER BY c.name
"""


@dataclass(frozen=True)
class ValidationReport:
    """A directory that chroma opened, with what it holds."""

    path: Path
    chroma_version: str
    collections: Mapping[str, int]

    @property
    def records(self) -> int:
        return sum(self.collections.values())


def sqlite_counts(path: Path) -> dict[str, int]:
    """Records per collection in the metadata segments of ``chroma.sqlite3`` (read-only;
    records still only in chroma's write-ahead log are not counted).

    IntegrityError if the file is missing, not SQLite, fails ``PRAGMA quick_check`` or
    lacks chroma's tables.
    """
    with _read_only(path) as db:
        check = db.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            raise IntegrityError(f"{path}/{SQLITE}: quick_check failed: {check[:3]}")
        counts = {name: int(n) for name, n in db.execute(_COUNTS)}
    if odd := [shown(name) for name in counts if not isinstance(name, str)]:
        raise IntegrityError(f"{path}/{SQLITE}: collection names that are not text: {odd[:3]}")
    return counts


@contextmanager
def _read_only(path: str | Path) -> Iterator[sqlite3.Connection]:
    """``chroma.sqlite3`` of ``path`` opened read-only; IntegrityError if it is missing or
    SQLite refuses it (not a database, damaged, lacking chroma's tables)."""
    db_file = Path(path) / SQLITE
    if not db_file.is_file():
        raise IntegrityError(f"{path} is not a chroma database: no {SQLITE}")
    try:
        db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
        db.text_factory = _text
        try:
            yield db
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise IntegrityError(f"{db_file}: {e}") from e


def _text(raw: bytes) -> str:
    """A TEXT value of a database that may be damaged or hostile: bytes that are not UTF-8
    are replaced, not raised from deep inside (a quick_check report quotes damaged pages;
    a name can hold anything)."""
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class CollectionView:
    """One collection as chroma's own ops tools show it."""

    name: str
    dimension: int | None
    records: int
    unsynced: int
    segment_bytes: int


@dataclass(frozen=True)
class ChromaView:
    """What is in a chroma directory, read from sqlite and the segment folders (no client)."""

    collections: tuple[CollectionView, ...]
    orphan_segments: tuple[str, ...]
    sqlite_bytes: int


def describe(path: str | Path) -> ChromaView:
    """Collections with record counts and dimensions, write-ahead-log entries the vector
    segment has not absorbed yet, per-collection segment sizes, and segment folders no
    collection owns. Read-only; IntegrityError if it is not a chroma database."""
    path = Path(path)
    counts = sqlite_counts(path)
    with _read_only(path) as db:
        cols = db.execute("SELECT id, name, dimension FROM collections").fetchall()
        segs = db.execute("SELECT id, collection, scope FROM segments").fetchall()
        synced = dict(db.execute("SELECT segment_id, seq_id FROM max_seq_id").fetchall())
        queue = db.execute("SELECT topic, seq_id FROM embeddings_queue").fetchall()
    folders = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        for p in path.iterdir()
        if p.is_dir()
    }
    views = []
    for cid, name, dim in cols:
        vector = [s for s, c, scope in segs if c == cid and scope == "VECTOR"]
        done = min((int(synced.get(s, 0)) for s in vector), default=0)
        pending = sum(1 for topic, seq in queue if topic.endswith(cid) and seq > done)
        size = sum(folders.get(s, 0) for s, c, _ in segs if c == cid)
        views.append(CollectionView(name, dim, counts.get(name, 0), pending, size))
    owned = {s for s, _, _ in segs}
    orphans = tuple(sorted(f for f in folders if f not in owned))
    return ChromaView(tuple(views), orphans, (path / SQLITE).stat().st_size)


def collection_dimensions(path: str | Path) -> dict[str, int | None]:
    """Each collection's embedding dimension (None until its first record is added), read
    from ``chroma.sqlite3`` without opening a client. IntegrityError if it is not chroma's."""
    with _read_only(path) as db:
        rows = db.execute("SELECT name, dimension FROM collections").fetchall()
    return {str(name): None if dim is None else int(dim) for name, dim in rows}


def validate(path: str | Path, *, deadline: DeadlineLike = None) -> ValidationReport:
    """Check that ``path`` is a sound chroma database: ``PRAGMA quick_check`` passes, chroma
    opens it, counts every collection (replaying its write-ahead log), reads every record's
    embedding back (each present and finite) and finds a stored vector through the vector
    index. IntegrityError otherwise, also when chroma's native code crashes on it: chroma
    runs in a child process. StorageTimeoutError if ``deadline`` passes first (none: no
    limit), KeyboardInterrupt as it comes; the child is killed either way."""
    path = Path(_path_arg(path, "validate's path"))
    dl = as_deadline(deadline, MAX_SECONDS)
    request = [str(path), sorted(sqlite_counts(path))]
    try:
        out = run_once(_PROBE, request, f"validating {path} with chroma", dl)
    except ChildFailed as e:
        raise IntegrityError(f"{path}: chroma {e} reading it") from e
    if "error" in out:
        raise IntegrityError(f"{path}: {out['error']}")
    counts = {str(k): int(v) for k, v in out["counts"].items()}
    return ValidationReport(path, chromadb.__version__, counts)


def consistent_copy(src: Path, dst: Path) -> None:
    """Copy a chroma directory so that the copy is one consistent state.

    Segment folders go first, ``chroma.sqlite3`` last through SQLite's backup API: chroma
    replays records the segments lack from its write-ahead log in sqlite on open, but
    segment files newer than the sqlite image would hold records it does not know. If a
    writer persisted a segment while we copied (its files' sizes or mtimes moved), the
    copy is not one state: IntegrityError, and the caller takes it again.
    """
    if not (Path(src) / SQLITE).is_file():
        raise IntegrityError(f"{src} is not a chroma database: no {SQLITE}")
    before = _segment_stamps(Path(src))
    dst.mkdir(parents=True)
    for entry in sorted(Path(src).iterdir()):
        if entry.name.startswith(SQLITE):
            continue
        if entry.is_dir():
            copy_tree(entry, dst / entry.name)  # the first error as itself (ENOSPC)
        else:
            shutil.copy2(entry, dst / entry.name)
    try:
        source = sqlite3.connect(f"file:{Path(src) / SQLITE}?mode=ro", uri=True)
        target = sqlite3.connect(dst / SQLITE)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
    except sqlite3.DatabaseError as e:
        if _sqlite_full(e):  # our copy's disk, not the database: no retry helps
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise disk_error(full, dst / SQLITE, "copying the database") from e
        raise IntegrityError(f"{src}: {e}") from e
    if _segment_stamps(Path(src)) != before:
        raise _Moved(f"{src}: a segment was persisted while it was being copied")


def _sqlite_full(e: sqlite3.Error) -> bool:
    """SQLITE_FULL: the disk (or sqlite's temp space) is full. Python < 3.11 has no error
    code on the exception, only sqlite's fixed message for it."""
    code = getattr(e, "sqlite_errorcode", None)
    return code == _SQLITE_FULL if code is not None else "disk is full" in str(e)


def _segment_stamps(src: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(src.rglob("*"))
        if p.is_file() and not p.name.startswith(SQLITE)
    }


@contextmanager
def open_client(
    store: SnapshotStore, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
) -> Iterator[Any]:
    """Check out ``name`` at ``ref`` and yield a PersistentClient on it."""
    with open_checkout(store, name, ref, deadline=deadline) as (client, _):
        yield client


@contextmanager
def open_checkout(
    store: SnapshotStore, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
) -> Iterator[tuple[Any, LocalSnapshot]]:
    """Like :func:`open_client`, also yielding the LocalSnapshot (version, source, stats)."""
    _check_store(store)
    snap = store.checkout(name, ref, deadline=deadline)  # temporary: release() reclaims it
    if not (snap.path / SQLITE).is_file():  # chroma would silently create an empty database
        snap.release()
        raise IntegrityError(
            f"{name} {snap.info.version} is not a chroma database (no {SQLITE}): "
            "nothing to open a client on"
        )
    client = chromadb.PersistentClient(path=str(snap.path), settings=client_settings())
    try:
        yield client, snap
    finally:
        close_client(client)
        snap.release()


def publish_client(
    store: SnapshotStore,
    name: str,
    client_or_path: Any,
    *,
    expected: Expected = LATEST,
    message: str | None = None,
    metadata: Mapping[str, object] | None = None,
    force: bool = False,
    attempts: int = 5,
    deadline: DeadlineLike = None,
) -> SnapshotInfo:
    """Publish a chroma database (a client, which is closed first, or a directory).

    A client must persist to a folder (an in-memory one is InvalidInputError and is left
    open); one opened with a relative path publishes the folder it holds open, wherever
    the working directory has moved since.

    The directory is copied consistently and the copy validated; a copy that fails
    validation is retaken (another process may be mid-way through persisting a
    segment) up to ``attempts`` times, then IntegrityError, unless ``force``: it publishes
    a copy that failed validation (a damaged database), never a folder that is not a chroma
    database at all (no ``chroma.sqlite3``; ``store.publish`` publishes any folder). A
    missing folder is InvalidInputError. The manifest records chroma's version and
    per-collection counts.
    """
    _check_store(store)
    if isinstance(client_or_path, str | os.PathLike):
        path, quiet = Path(_path_arg(client_or_path, "publish_client's folder")), False
    elif callable(getattr(client_or_path, "get_settings", None)):
        path, quiet = client_folder(client_or_path), True
        close_client(client_or_path)  # chroma flushes on stop; nothing of ours writes after
    else:
        raise InvalidInputError(
            f"publish_client takes a chroma client or a folder, not {shown(client_or_path)}"
        )
    _check_source(path)
    # the copies and the upload share one deadline; without one, the store's default
    dl = None if deadline is None else as_deadline(deadline, 0.0)
    # removed whatever happens, and after a kill by the next publish: nothing of the copy
    # stays behind
    with scratch_dir("chroma-snapshots-publish-", "making a folder for the copy to publish") as tmp:
        copy, report = _validated_copy(path, Path(tmp), attempts, force, quiet, dl)
        chroma_meta: dict[str, object] = {"version": chromadb.__version__}
        if report is not None:
            chroma_meta["collections"] = dict(report.collections)
        meta = {**(metadata or {}), "chroma": chroma_meta}
        with published_from(path):  # the folder copied is checked as the source too
            return store.publish(
                name, copy, expected=expected, message=message, metadata=meta, deadline=dl
            )  # fmt: skip


def _check_store(store: object) -> None:
    """InvalidInputError for a store argument that is none (a URL: ``open_store`` makes
    one), before an attribute error from deep inside."""
    if not isinstance(store, SnapshotStore):
        raise InvalidInputError(
            f"expected a store (RemoteStore, CachedStore, open_store(url)), not {shown(store)}"
        )


def _path_arg(raw: object, what: str) -> str:
    if (path := path_text(raw)) is None:
        raise InvalidInputError(f"{what} must be a path, not {shown(raw)}")
    return path


def _check_source(path: Path) -> None:
    """A folder that is missing, or holds no chroma database, is refused before any copy."""
    if not path.is_dir():
        why = "is not a directory" if path.exists() else "does not exist"
        raise InvalidInputError(f"cannot publish {path}: it {why}")
    if not (path / SQLITE).is_file():
        raise IntegrityError(
            f"refusing to publish {path}: not a chroma database (no {SQLITE}); force=True "
            "publishes a copy that failed validation, not this; store.publish publishes any folder"
        )


def _validated_copy(
    src: Path, tmp: Path, attempts: int, force: bool, compare: bool, dl: Deadline | None
) -> tuple[Path, ValidationReport | None]:
    """A validated consistent copy of ``src``. With ``compare`` (nothing writes to ``src``
    any more: its client was closed) the copy's per-collection counts must also equal the
    source's."""
    copy = tmp / "copy"

    def take(n: int) -> tuple[Path, ValidationReport | None]:
        if n > 1 and dl is not None:
            dl.check(f"retaking the copy of {src} to publish")  # StorageTimeoutError
        remove_tree(copy)  # a failed attempt's copy: its space is the retake's
        try:
            consistent_copy(src, copy)
            if compare and sqlite_counts(copy) != sqlite_counts(src):
                raise _Moved(f"{copy}: record counts differ from {src}")
            return copy, validate(copy, deadline=dl)
        except (IntegrityError, FileNotFoundError) as e:  # a file vanished mid-copy
            # not a chroma database: retaking the copy cannot help
            raise (_Retake if (src / SQLITE).is_file() else _Unusable)(e) from e
        except OSError as e:  # our copy's disk is full or failing: no retry helps
            if isinstance(e, SnapshotError):
                raise
            # a copy names the source first and its target second: the target is ours
            where = e.filename2 or e.filename or copy
            raise disk_error(e, where, "copying the database to publish") from e

    try:
        return IMMEDIATE.with_(attempts=max(1, attempts)).call(take, retry_on=(_Retake,))
    except (_Retake, _Unusable) as e:
        last = e.__cause__
    if force and copy.is_dir():
        return copy, None
    if isinstance(last, _Moved):  # contention, not damage: say so
        raise IntegrityError(
            f"refusing to publish {src}: it kept changing while it was copied "
            f"({max(1, attempts)} takes; the last: {last}). Nothing was published, and the "
            "database is not known to be damaged: publish again when its writers pause"
        ) from last
    raise IntegrityError(f"refusing to publish {src}: {last}") from last


class _Moved(IntegrityError):
    """A copy that is not one state because a writer moved the database meanwhile."""


class _Retake(Exception):
    """The copy was not consistent (a writer was active): take it again."""


class _Unusable(Exception):
    """The copy failed in a way another take cannot fix."""
