"""Listing and deep verification of stored versions (pruning: pruning.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

from .backends.base import Backend
from .backends.bounded import DeadlineBackend
from .chunking import decode_chunk
from .deadline import Deadline, WorkerPool, wait_all, within
from .errors import IntegrityError, SnapshotNotFoundError
from .models import Chunk, VersionId
from .store import VerifyReport
from .validation import sha256_hex

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

    # This call's own pool (see WorkerPool): downloads a timed-out verify abandons hold
    # only its threads, never a later call's.
    with WorkerPool(store.workers) as pool:
        futures = [pool.submit(within, deadline, partial(check, p)) for p in sorted(by_pack)]
        results = wait_all(futures, deadline, "verify")
    problems = tuple(p for _, ps in results for p in ps)
    return VerifyReport(
        name, version, len(by_pack), len(manifest.chunks), sum(n for n, _ in results), problems
    )
