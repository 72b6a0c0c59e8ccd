"""``prune``: delete old versions and dead packs without racing publishers, ref moves or readers.

The steps (why each is safe: docs/RELIABILITY.md, "Prune protocol"):

1. write an empty record ``gc/{id}.json`` (its modification time is the server's "now");
2. list everything (L1), read refs and live pins, and plan: keep the newest ``keep_last``
   versions, every referenced or pinned one, and every one whose manifest or retirement
   note is younger than ``min_age``; condemn the rest, and every pack no kept version uses
   that is older than ``min_age`` and older than every live pin;
3. write the plan into the record, so ref movers that pin from now on see it;
4. list again (L2), read refs and pins again: spare every version referenced or pinned now
   and every manifest that appeared since L1, with their packs;
5. delete condemned manifests, then condemned packs; the record stays until it expires
   (a delete that returned may still have an earlier attempt in flight). A prune that
   fails or is interrupted before step 5 removes its record: it deleted nothing.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from chroma_snapshots.backends.base import ObjectMeta
from chroma_snapshots.backends.bounded import DeadlineBackend, tidy
from chroma_snapshots.engine import keys
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.keys import retired_key
from chroma_snapshots.engine.models import VersionId
from chroma_snapshots.engine.validation import check_flags, check_name, number_in
from chroma_snapshots.errors import (
    IntegrityError,
    InvalidInputError,
    SnapshotError,
    SnapshotNotFoundError,
    shown,
)
from chroma_snapshots.stores.base import PruneReport
from chroma_snapshots.stores.claims import UNREADABLE, Claim, create_once, read_claims, rewrite

if TYPE_CHECKING:
    from chroma_snapshots.stores.base import BackedStore


TEMP_AGE = 3600.0  # a temp file this old belongs to no live writer (file stores)


@dataclass
class _Listing:
    """One listing of ``{name}/``, sorted by kind."""

    manifests: dict[str, ObjectMeta] = field(default_factory=dict)
    packs: dict[str, ObjectMeta] = field(default_factory=dict)
    notes: dict[str, ObjectMeta] = field(default_factory=dict)
    other: dict[str, ObjectMeta] = field(default_factory=dict)

    @classmethod
    def of(cls, metas: Iterable[ObjectMeta], name: str) -> _Listing:
        out = cls()
        for m in metas:
            kind, rest = keys.split(name, m.key)
            version = rest.removesuffix(".json")
            if kind == keys.MANIFESTS and rest.endswith(".json") and VersionId.is_version(version):
                out.manifests[version] = m
            elif (pack := keys.pack_at(name, m.key)) is not None:
                out.packs[pack] = m  # (anything else below packs/ is not ours: left alone)
            elif kind == keys.RETIRED and VersionId.is_version(rest):
                out.notes[rest] = m
            else:
                out.other[m.key] = m
        return out


@dataclass
class _Pass:
    """What one look at the store (listing, refs, live pins) shows reachable."""

    listing: _Listing
    now: float
    referenced: set[str]
    pinned_versions: set[str]
    pinned_packs: set[str]
    pins_since: float


def _look(store: BackedStore, io: DeadlineBackend, name: str, record: str | None) -> _Pass:
    listing = _Listing.of(io.list(f"{name}/"), name)
    # The server's clock: our record's modification time (a dry run has no record).
    now = listing.other[record].last_modified if record in listing.other else time.time()
    # Pins, then refs: a mover whose pin is gone when we list pins has moved its ref before,
    # so the refs we read next show it; one still working still has its pin. (Refs first
    # would miss a mover that moves its ref and drops its pin between the two reads.)
    pins = read_claims(io, keys.prefix(name, keys.PINS), now)
    referenced = set(store.refs(name, deadline=io.deadline).values())
    return _Pass(
        listing,
        now,
        referenced,
        {v for _, c in pins for v in c.versions},
        {p for _, c in pins for p in c.packs},
        min((m.last_modified for m, _ in pins), default=float("inf")),
    )


def prune(
    store: BackedStore,
    name: str,
    *,
    keep_last: int,
    min_age: float,
    dry_run: bool,
    deadline: Deadline,
) -> PruneReport:
    """Delete versions outside the newest ``keep_last`` that nothing references, pins, or
    stopped referencing less than ``min_age`` seconds ago, then packs no kept version uses."""
    check_name(name)
    # min_age: a number, not a bool (True was 1 second) nor NaN; inf keeps every version
    if type(keep_last) is not int or keep_last < 1 or not number_in(min_age, 0, math.inf):
        raise InvalidInputError(
            f"prune needs keep_last >= 1 and min_age >= 0 seconds, not {shown(keep_last)}, "
            f"{shown(min_age)}"
        )
    check_flags({"dry_run": dry_run})  # None, or "no", applied the prune
    io = DeadlineBackend(store.backend, deadline)
    if dry_run:
        first, keep, drop, _, dead = _first_look(store, io, name, None, keep_last, min_age)
        # no record of ours to date the storage's "now" by: counting only, the client's clock
        left = io.sweep_temp(f"{name}/", first.now - TEMP_AGE, remove=False)
        return replace(_report(name, keep, drop, dead, first, dry_run=True), swept_temp_files=left)
    record = f"{keys.prefix(name, keys.GC)}{uuid.uuid4().hex}.json"
    # created once and then only replaced by us (see rewrite)
    etag = create_once(io, record, Claim(frozenset(), frozenset(), deadline.remaining()).to_json())
    try:
        keep, drop, dead, second = _plan(store, io, name, record, etag, keep_last, min_age)
    except BaseException:  # Ctrl-C too: nothing was deleted, movers need not wait for it
        with contextlib.suppress(SnapshotError):
            tidy(io, [record], "removing the prune's record")
        raise
    _delete(io, name, drop, dead, second)
    # what writers killed mid-write left, aged by the storage's clock (a client whose clock
    # runs ahead would otherwise take a live writer's temp file for an old one)
    swept = io.sweep_temp(f"{name}/", second.now - TEMP_AGE)
    # The record stays until it expires (its ttl covers our deadline, + SKEW): a delete
    # that returned may still have an earlier attempt in flight (the client retried it and
    # the retry answered first), and that copy would remove a pack a later publish wrote
    # again. A later prune removes it.
    return replace(_report(name, keep, drop, dead, second, dry_run=False), swept_temp_files=swept)


def _first_look(
    store: BackedStore,
    io: DeadlineBackend,
    name: str,
    record: str | None,
    keep_last: int,
    min_age: float,
) -> tuple[_Pass, set[str], list[str], set[str], list[str]]:
    """Steps 2: the look, the versions kept and dropped, the packs the kept use, the
    packs condemned."""
    first = _look(store, io, name, record)
    keep = _kept_versions(first, keep_last, min_age)
    drop = sorted(set(first.listing.manifests) - keep, reverse=True)
    used = _packs_of(store, name, keep, io.deadline)
    return first, keep, drop, used, _dead_packs(first, used, min_age)


def _plan(
    store: BackedStore,
    io: DeadlineBackend,
    name: str,
    record: str,
    etag: str,
    keep_last: int,
    min_age: float,
) -> tuple[set[str], list[str], list[str], _Pass]:
    """Steps 2 to 4: what to keep, the versions and packs to delete, the second look."""
    first, keep, drop, used, dead = _first_look(store, io, name, record, keep_last, min_age)
    plan = Claim(frozenset(drop), frozenset(dead), io.deadline.remaining())
    rewrite(io, record, plan.to_json(), etag)
    second = _look(store, io, name, record)
    rescued = (
        second.referenced
        | second.pinned_versions
        | (set(second.listing.manifests) - set(first.listing.manifests))
    ) - keep
    keep |= rescued
    drop = [v for v in drop if v not in rescued]
    used |= _packs_of(store, name, rescued, io.deadline)
    condemned = set(dead)
    dead = [p for p in _dead_packs(second, used, min_age) if p in condemned]
    return keep, drop, dead, second


def _kept_versions(look: _Pass, keep_last: int, min_age: float) -> set[str]:
    versions = sorted(look.listing.manifests, reverse=True)
    young = {
        v
        for v in versions
        if look.now - look.listing.manifests[v].last_modified < min_age
        or (v in look.listing.notes and look.now - look.listing.notes[v].last_modified < min_age)
    }
    return set(versions[:keep_last]) | look.referenced | look.pinned_versions | young


def _packs_of(store: BackedStore, name: str, versions: Iterable[str], dl: Deadline) -> set[str]:
    used: set[str] = set()
    for v in versions:
        try:
            used |= store.load_manifest(name, v, deadline=dl).packs
        except SnapshotNotFoundError:
            continue  # never stored, or deleted by another prune: it needs nothing
        except IntegrityError:
            # An unreadable kept manifest must not let us delete packs it may need.
            raise IntegrityError(f"prune stopped: retained version {v} is unreadable") from None
    return used


def _dead_packs(look: _Pass, used: set[str], min_age: float) -> list[str]:
    return sorted(
        p
        for p, m in look.listing.packs.items()
        if p not in used
        and p not in look.pinned_packs
        and look.now - m.last_modified >= min_age
        and m.last_modified < look.pins_since  # written before every live pin
    )


def _delete(io: DeadlineBackend, name: str, drop: list[str], dead: list[str], look: _Pass) -> None:
    from chroma_snapshots.engine.keys import manifest_key, pack_key

    # Manifests first: a crash in between leaves unreferenced packs, never a broken version.
    keys = [manifest_key(name, v) for v in drop]
    io.delete_many(keys + [k + ".sig" for k in keys] + [retired_key(name, v) for v in drop])
    io.delete_many([pack_key(name, p) for p in dead])
    io.delete_many(_expired(io, name, look))


def _expired(io: DeadlineBackend, name: str, look: _Pass) -> list[str]:
    """Pins and records of owners long gone, and notes of versions no longer stored."""
    out = []
    for key, meta in look.listing.other.items():
        if key.startswith((keys.prefix(name, keys.PINS), keys.prefix(name, keys.GC))):
            try:
                claim = Claim.from_json(io.get(key).data, key)
            except SnapshotNotFoundError:
                continue
            except IntegrityError:
                claim = UNREADABLE  # garbage: expire by age alone
            if not claim.live(meta, look.now):
                out.append(key)
    for version in set(look.listing.notes) - set(look.listing.manifests):
        out.append(retired_key(name, version))
    return out


def _report(
    name: str, keep: set[str], drop: list[str], dead: list[str], look: _Pass, *, dry_run: bool
) -> PruneReport:
    return PruneReport(
        name,
        tuple(sorted(keep & set(look.listing.manifests), reverse=True)),
        tuple(drop),
        tuple(dead),
        sum(look.listing.packs[p].size for p in dead),
        dry_run,
    )
