"""The small objects that let prune run beside ref movers and readers (docs/RELIABILITY.md).

Below ``{name}/`` on the backend::

    pins/{id}.json       a ref mover's claim: versions and packs it is about to make reachable
    gc/{id}.json         a prune's record: the versions and packs it condemned
    retired/{version}    written just before a ref moves away from ``version``: the time a
                         reader's grace starts

Pins and records have the same shape (a :class:`Claim`). Both carry a time to live; a
claim is honoured until ``last_modified + ttl + SKEW``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from chroma_snapshots.backends.base import Backend, ObjectMeta, PutMode
from chroma_snapshots.backends.bounded import tidy
from chroma_snapshots.engine import keys
from chroma_snapshots.engine import validation as val
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.keys import retired_key
from chroma_snapshots.engine.models import VersionId
from chroma_snapshots.errors import (
    ConflictError,
    IntegrityError,
    SnapshotError,
    SnapshotNotFoundError,
)

log = logging.getLogger(__name__)

SKEW = 900.0
"""Seconds a claim outlives its ttl: a request abandoned at its deadline may still land
late, and client and server clocks may differ (S3 refuses requests skewed by more than
15 minutes, so no working client is further off)."""
MAX_CLAIM_BYTES = 64 << 20


@dataclass(frozen=True)
class Claim:
    """Versions and packs named by a pin or a prune record, valid for ``ttl`` seconds."""

    versions: frozenset[str]
    packs: frozenset[str]
    ttl: float

    def to_json(self) -> bytes:
        return val.canonical_json(
            {
                "format": val.FORMAT_VERSION,
                "versions": sorted(self.versions),
                "packs": sorted(self.packs),
                "ttl": int(self.ttl) + 1,
            }
        )

    @classmethod
    def from_json(cls, data: bytes, what: str) -> Claim:
        """Parse and validate; IntegrityError on anything unexpected."""
        raw = val.loads_json(data, what, MAX_CLAIM_BYTES)
        o = val.as_obj(raw, what, {"format", "versions", "packs", "ttl"})
        if o["format"] != val.FORMAT_VERSION:
            raise IntegrityError(f"{what}: format {o['format']!r} is not supported")
        versions = val.as_list(o["versions"], f"{what} versions")
        for v in versions:
            if not isinstance(v, str) or not VersionId.is_version(v):
                raise IntegrityError(f"{what}: invalid version {v!r}")
        packs = [val.as_hex64(p, f"{what} pack") for p in val.as_list(o["packs"], what)]
        ttl = val.as_int(o["ttl"], f"{what} ttl", 0, 1 << 40)
        return cls(frozenset(versions), frozenset(packs), float(ttl))

    def until(self, meta: ObjectMeta) -> float:
        """When the claim written at ``meta.last_modified`` stops being honoured."""
        return meta.last_modified + self.ttl + SKEW

    def live(self, meta: ObjectMeta, now: float) -> bool:
        """True while the claim written at ``meta.last_modified`` must be honoured."""
        return now < self.until(meta)


UNREADABLE = Claim(frozenset(), frozenset(), 0.0)
"""What an unreadable claim is taken for: it names nothing knowable, and lives by age alone."""


def read_claims(io: Backend, prefix: str, now: float) -> list[tuple[ObjectMeta, Claim]]:
    """Every live claim below ``prefix`` (claims deleted while listing are skipped). One that
    cannot be read is IntegrityError while it is young (it may name anything: refuse), and
    skipped once older than a claim with no ttl would live (a stray file or damage: a README
    dropped in ``gc/`` stopped every ref move, one in ``pins/`` every prune, for good)."""
    found = []
    for meta in io.list(prefix):
        try:
            claim = Claim.from_json(io.get(meta.key).data, meta.key)
        except SnapshotNotFoundError:
            continue  # its owner finished meanwhile
        except IntegrityError:
            if UNREADABLE.live(meta, now):
                raise
            continue  # (prune removes it: pruning._expired ages garbage the same way)
        if claim.live(meta, now):
            found.append((meta, claim))
    return found


class Pin:
    """What a ref mover holds while it works: written *before* it reads prune records, so
    either a prune sees the pin and spares what it names, or the mover sees the prune's
    record (or, once that prune finished, the deletion itself) and refuses.

    ``since`` semantics: a prune also spares every pack written after a live pin, so the
    new packs of a publish in flight need no pin of their own.
    """

    def __init__(self, io: Backend, name: str, deadline: Deadline) -> None:
        self._io = io
        self._name = name
        self._deadline = deadline
        self._keys: list[str] = []
        self._created: list[str] = []

    def add(self, versions: Iterable[str] = (), packs: Iterable[str] = ()) -> None:
        """Claim ``versions`` and ``packs`` (one small object per call)."""
        claim = Claim(frozenset(versions), frozenset(packs), self._deadline.remaining())
        key = f"{keys.prefix(self._name, keys.PINS)}{uuid.uuid4().hex}.json"
        create_once(self._io, key, claim.to_json())
        self._keys.append(key)

    def check(self, versions: Iterable[str] = (), packs: Iterable[str] = ()) -> None:
        """ConflictError if a prune in flight condemned any of ``versions`` or ``packs``.
        Call after :meth:`add` named them, then confirm they exist (load, overwrite)."""
        want_v, want_p = set(versions), set(packs)
        # A record's age by the storage's clock, read off our own pin (written just now),
        # not by ours: a file store on a mount has no S3 to refuse a client whose clock is off.
        now = self._io.head(self._keys[-1]).last_modified if self._keys else time.time()
        for meta, claim in read_claims(self._io, keys.prefix(self._name, keys.GC), now):
            hit = sorted((claim.versions & want_v) | (claim.packs & want_p))
            if hit:
                until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claim.until(meta)))
                raise ConflictError(
                    f"{self._name}: a prune ({meta.key}) deletes or deleted {hit[0]}"
                    f"{' and more' if len(hit) > 1 else ''}; nothing was made visible. Its "
                    f"record holds until {until} (a delete it sent may still land): retry "
                    "after that (a version it deleted is then not found), or publish "
                    "different content"
                )

    def created(self, pack: str) -> None:
        """Note a pack this mover created (it did not exist): see :meth:`check_created`."""
        self._created.append(pack)  # list.append is atomic: packs go up on several threads

    def check_created(self) -> None:
        """ConflictError if a live prune record condemns a pack this mover created: that
        prune may have deleted the pack just before, and a copy of its delete may still
        land (a record outlives its deletes for that reason). Call after the packs are
        written, before the manifest."""
        if self._created:
            self.check(packs=self._created)

    def release(self) -> None:
        """Drop the pin. A failure only delays pruning until the pin expires."""
        keys, self._keys = self._keys, []
        if keys:
            try:
                tidy(self._io, keys, "removing pins")
            except SnapshotError as e:
                log.warning("could not remove pins %s (they expire by themselves): %s", keys, e)


def note_retired(io: Backend, name: str, version: str, ref: str, generation: int) -> None:
    """Record that ``ref`` is about to move away from ``version``, which it holds at
    ``generation``: a reader that resolved it a moment ago keeps its grace, measured from
    now, not from the version's publication; and the mover that wrote that generation,
    if its answer was lost, learns that it landed (:func:`moved_on_from`)."""
    note = val.canonical_json({"ref": ref, "generation": generation})
    io.put(retired_key(name, version), note, mode=PutMode.OVERWRITE)


def moved_on_from(io: Backend, name: str, version: str, ref: str, generation: int) -> bool:
    """True if a mover noted that ``ref`` held ``version`` at ``generation`` and moved on
    from it. A ref's generation is written once, by one compare-and-swap: a mover whose
    write of it was answered with an error and which now finds the ref elsewhere learns
    here that its write did land (notes of older releases are empty: False)."""
    try:
        got = io.get(retired_key(name, version), byte_range=(0, 4096))  # a hostile one: 4 KiB
        raw = val.loads_json(got.data, "note", 4095)
    except (SnapshotNotFoundError, IntegrityError):
        return False
    return raw == {"ref": ref, "generation": generation}


def create_once(io: Backend, key: str, data: bytes) -> str:
    """Create ``key`` and return its ETag. If it exists with exactly ``data``, that was us:
    a retried request whose first attempt landed although its answer was lost (a 500 or a
    reset after the write) meets its own object. Different bytes stay a ConflictError."""
    try:
        return io.put(key, data, mode=PutMode.CREATE).etag
    except ConflictError:
        got = io.get(key)
        if got.data != data:
            raise
        return got.meta.etag


def rewrite(io: Backend, key: str, data: bytes, etag: str) -> str:
    """Replace ``key``, written by us with ``etag``, by ``data``; return the new ETag. A
    late copy of an earlier write of ours can then never land over it (its condition fails),
    and a retry of this one whose first attempt landed meets exactly ``data``."""
    try:
        return io.put(key, data, mode=PutMode.update(etag)).etag
    except ConflictError:
        got = io.get(key)
        if got.data != data:
            raise
        return got.meta.etag
