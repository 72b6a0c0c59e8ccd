"""Listing and deep verification of stored versions (pruning: pruning.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

from chroma_snapshots.backends.base import Backend
from chroma_snapshots.backends.bounded import DeadlineBackend
from chroma_snapshots.engine import keys
from chroma_snapshots.engine.deadline import Deadline, WorkerPool, wait_all, within
from chroma_snapshots.engine.delta_io import check_deltas, decode_keyframe
from chroma_snapshots.engine.models import Chunk, VersionId
from chroma_snapshots.engine.validation import sha256_hex
from chroma_snapshots.errors import IntegrityError, SnapshotNotFoundError
from chroma_snapshots.stores.base import VerifyReport

if TYPE_CHECKING:
    from chroma_snapshots.stores.base import BackedStore


def list_versions(backend: Backend, name: str) -> Iterator[str]:
    """Version ids stored for ``name``, newest first (ids sort by time)."""
    prefix = keys.prefix(name, keys.MANIFESTS)
    found = []
    for meta in backend.list(prefix):
        version = meta.key[len(prefix) :].removesuffix(".json")
        if VersionId.is_version(version):
            found.append(version)
    yield from sorted(found, reverse=True)


def verify(store: BackedStore, name: str, version: str, deadline: Deadline) -> VerifyReport:
    """Download every pack the version uses and check each pack's and chunk's hash."""
    from chroma_snapshots.engine.keys import pack_key

    manifest = store.load_manifest(name, version, deadline=deadline)
    io = DeadlineBackend(store.backend, deadline)
    by_pack: dict[str, list[Chunk]] = defaultdict(list)
    for c in manifest.chunks.values():
        by_pack[c.pack].append(c)

    # Deltas are checked once every pack is read: their stored bytes, and the decoded
    # bytes of keyframes that chains rest on, are kept until then.
    bases = {c.base for c in manifest.chunks.values() if c.base is not None}
    deltas: dict[str, bytes] = {}
    keyframes: dict[str, bytes | memoryview] = {}

    def check(pack: str) -> tuple[int, list[str]]:
        try:
            data = io.get(pack_key(name, pack)).data
        except SnapshotNotFoundError:
            return 0, [f"pack {pack} is missing"]
        problems = [] if sha256_hex(data) == pack else [f"pack {pack}: hash mismatch"]
        for c in by_pack[pack]:
            stored = data[c.offset : c.offset + c.length]
            if c.base is not None:
                deltas[c.hash] = stored
                continue
            try:
                raw = decode_keyframe(c, stored)  # a chain link by place: size only
            except IntegrityError as e:
                problems.append(str(e))
                continue
            if c.hash in bases:
                keyframes[c.hash] = raw
        return len(data), problems

    # This call's own pool (see WorkerPool): downloads a timed-out verify abandons hold
    # only its threads, never a later call's.
    with WorkerPool(store.workers) as pool:
        futures = [pool.submit(within, deadline, partial(check, p)) for p in sorted(by_pack)]
        results = wait_all(futures, deadline, "verify")
    problems = tuple(p for _, ps in results for p in ps) + tuple(
        check_deltas(manifest.chunks, deltas, keyframes)
    )
    return VerifyReport(
        name, version, len(by_pack), len(manifest.chunks), sum(n for n, _ in results), problems
    )
