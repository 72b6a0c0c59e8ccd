"""Listing, deep verification and pruning of stored versions."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .backends.base import Backend
from .backends.bounded import DeadlineBackend
from .chunking import decode_chunk
from .deadline import Deadline, run_within
from .errors import IntegrityError, InvalidInputError, SnapshotError, SnapshotNotFoundError
from .models import Chunk, VersionId
from .store import PruneReport, VerifyReport
from .validation import check_name, sha256_hex

if TYPE_CHECKING:
    from .remote import RemoteStore


def list_versions(backend: Backend, name: str) -> Iterator[str]:
    """Version ids stored for ``name``, newest first (ids sort by time)."""
    prefix = f"{name}/manifests/"
    found = []
    for meta in backend.list(prefix):
        version = meta.key[len(prefix) :].removesuffix(".json")
        if VersionId.is_version(version):
            found.append(version)
    yield from sorted(found, reverse=True)


def verify(store: RemoteStore, name: str, version: str, deadline: Deadline) -> VerifyReport:
    """Download every pack the version uses and check each pack's and chunk's hash."""
    from .remote import pack_key

    manifest = store.load_manifest(name, version, deadline=deadline)
    io = DeadlineBackend(store.backend, deadline)
    by_pack: dict[str, list[Chunk]] = defaultdict(list)
    for c in manifest.chunks.values():
        by_pack[c.pack].append(c)

    def check(pack: str) -> tuple[int, list[str]]:
        try:
            data = io.get(pack_key(name, pack)).data
        except SnapshotNotFoundError:
            return 0, [f"pack {pack} is missing"]
        problems = [] if sha256_hex(data) == pack else [f"pack {pack}: hash mismatch"]
        for c in by_pack[pack]:
            try:
                decode_chunk(c, data[c.offset : c.offset + c.length])
            except IntegrityError as e:
                problems.append(str(e))
        return len(data), problems

    results = run_within(deadline, "verify", lambda: list(store._pool.map(check, sorted(by_pack))))
    problems = tuple(p for _, ps in results for p in ps)
    return VerifyReport(
        name, version, len(by_pack), len(manifest.chunks), sum(n for n, _ in results), problems
    )


def prune(
    store: RemoteStore,
    name: str,
    *,
    keep_last: int,
    min_age: float,
    dry_run: bool,
    deadline: Deadline,
) -> PruneReport:
    """Delete versions outside the newest ``keep_last`` that no ref names and that are older
    than ``min_age`` seconds, then packs no retained version uses (also older than ``min_age``,
    so a publish in flight keeps the packs it is uploading or reusing)."""
    from .remote import manifest_key

    check_name(name)
    if keep_last < 1 or min_age < 0:
        raise InvalidInputError("prune needs keep_last >= 1 and min_age >= 0")
    now = time.time()
    backend = DeadlineBackend(store.backend, deadline)
    metas = {m.key: m for m in backend.list(f"{name}/")}
    versions = list(list_versions(backend, name))
    pinned = set(store.refs(name, deadline=deadline).values())
    keep: list[str] = []
    drop: list[str] = []
    for i, v in enumerate(versions):
        age = now - metas[manifest_key(name, v)].last_modified
        (keep if i < keep_last or v in pinned or age < min_age else drop).append(v)
    used: set[str] = set()
    for v in keep:
        try:
            used |= store.load_manifest(name, v, deadline=deadline).packs
        except SnapshotError:
            # An unreadable retained manifest must not let us delete packs it may need.
            raise IntegrityError(f"prune stopped: retained version {v} is unreadable") from None
    dead = [
        m
        for k, m in metas.items()
        if "/packs/" in k and k.rsplit("/", 1)[1] not in used and now - m.last_modified >= min_age
    ]
    if not dry_run:
        # manifests first: a crash in between leaves unreferenced packs, never a broken version
        keys = [manifest_key(name, v) for v in drop]
        backend.delete_many(keys + [k + ".sig" for k in keys])
        backend.delete_many([m.key for m in dead])
    return PruneReport(
        name,
        tuple(keep),
        tuple(drop),
        tuple(m.key.rsplit("/", 1)[1] for m in dead),
        sum(m.size for m in dead),
        dry_run,
    )
