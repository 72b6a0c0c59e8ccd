"""Copying versions between stores (S3 -> an EFS mirror), moving only what is missing."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from chroma_snapshots.backends.base import PutMode
from chroma_snapshots.backends.bounded import DeadlineBackend
from chroma_snapshots.engine import manifest_v2
from chroma_snapshots.engine.deadline import Deadline, DeadlineLike, as_deadline
from chroma_snapshots.engine.keys import manifest_key, pack_key
from chroma_snapshots.errors import ConflictError, IntegrityError, SnapshotNotFoundError
from chroma_snapshots.ops import maintenance
from chroma_snapshots.stores.refs import name_is_signed, unsigned_over_signed

if TYPE_CHECKING:
    from chroma_snapshots.stores.base import BackedStore


def sync_version(
    src: BackedStore,
    dst: BackedStore,
    name: str,
    version: str,
    *,
    ref: str | None = "latest",
    deadline: DeadlineLike = None,
    verify: bool = False,
    follow: bool = False,
) -> int:
    """Copy ``version`` of ``name`` from ``src`` to ``dst``: packs it lacks, then the manifest,
    then (if ``ref``) point ``dst``'s ref at it. Returns the bytes copied.

    Same order as a publish, so ``dst`` never has a ref to an incomplete version. The ref
    moves by compare-and-swap against what it named when the sync began: one another
    writer moved meanwhile is ConflictError, never overwritten. ``verify``: before the ref
    moves, read every pack of the version back from ``dst`` and check every chunk (a
    damaged pack already there is otherwise trusted by its name): IntegrityError if one
    fails, the ref left as it was. Without a
    signing key for ``dst``, a signed version, or any version of a name whose ``latest`` in
    ``dst`` is signed, is ConfigError before anything is copied: the refs the sync moves
    would go unsigned, and every reader holding the key would refuse them. ``follow`` (a
    mirror's copy): the ref moves to where ``src``'s is (:func:`follow_ref`), instead of
    against what it named when the sync began.
    """
    dl = as_deadline(deadline, src.default_timeout)
    manifest = src.load_manifest(name, version, deadline=dl)
    s_io, d_io = DeadlineBackend(src.backend, dl), DeadlineBackend(dst.backend, dl)
    mkey = manifest_key(name, version)
    try:
        sig = s_io.get(mkey + ".sig").data
    except SnapshotNotFoundError:
        sig = None
    if not dst.trust and (sig is not None or name_is_signed(d_io, name)):
        # refs moved to it would go unsigned: readers holding the key would refuse the name
        where = "in the source" if sig is not None else "in the destination"
        raise unsigned_over_signed(f"{name} ({where})")
    before = None if ref is None or follow else dst.refs(name, deadline=dl).get(ref)
    copied = 0
    # Claimed on dst like a publish claims its packs, so a prune of dst cannot delete a
    # pack we found there and rely on (docs/RELIABILITY.md, "Prune protocol").
    with dst.pinned(name, [], dl) as pin:
        present = [p for p in sorted(manifest.packs) if d_io.exists(pack_key(name, p))]
        if present:
            pin.add(packs=present)
            pin.check(packs=present)
        for pack in sorted(manifest.packs):
            key = pack_key(name, pack)
            if not d_io.exists(key):  # after the check: one a prune deleted is copied again
                data = s_io.get(key).data
                with contextlib.suppress(ConflictError):  # content-addressed: same bytes
                    d_io.put(key, data, mode=PutMode.CREATE)
                    pin.created(pack)
                copied += len(data)
        pin.check_created()
        if sig is not None:
            with contextlib.suppress(ConflictError):
                d_io.put(mkey + ".sig", sig, mode=PutMode.CREATE)
        with contextlib.suppress(ConflictError):
            d_io.put(mkey, manifest_v2.dumps(manifest), mode=PutMode.CREATE)
        if verify:
            check_copy(dst, name, version, dl)
        if follow and ref is not None:
            follow_ref(src, dst, name, ref, version, dl)  # the version still pinned
        elif ref is not None:
            move_ref(dst, name, ref, version, before, dl)
    return copied


def move_ref(
    dst: BackedStore, name: str, ref: str, version: str, before: str | None, dl: DeadlineLike
) -> None:
    """Point ``dst``'s ``ref`` at ``version`` by compare-and-swap against ``before`` (what
    it named when the sync began): ConflictError if another writer moved it meanwhile,
    unless to ``version`` itself (another sync of the same version got there first)."""
    if before == version:
        return
    try:
        dst.set_ref(name, ref, version, expected=before, deadline=dl)
    except ConflictError:
        if dst.refs(name, deadline=dl).get(ref) != version:
            raise


def follow_ref(
    src: BackedStore, dst: BackedStore, name: str, ref: str, version: str, dl: Deadline
) -> None:
    """Point ``dst``'s ``ref`` (a mirror's) where ``src``'s (the source of truth's) is,
    after copying ``version`` there: a version ``dst`` lacks is left to its own mirroring.
    So writers mirroring at once leave the mirror where the source of truth is: a swap
    against what the mirror named when the copy began let an older version's mirroring
    land after a newer one's, and a swap that landed after the source of truth moved on
    (a rollback that found the mirror already where it pointed) stayed there.
    ``version`` must be whole in ``dst`` and kept from prunes (see ``sync_version``).

    Each look reads ``dst``, then ``src``, and swaps against the first read; after a swap
    it looks again, so the last swap to land is checked against ``src`` after it landed."""
    while True:
        dl.check(f"mirroring {name}/{ref}")
        seen = dst.refs(name, deadline=dl).get(ref)
        want = src.refs(name, deadline=dl).get(ref)
        if want is None or want == seen:
            return
        try:
            dst.set_ref(name, ref, want, expected=seen, deadline=dl)
        except ConflictError:
            if dst.refs(name, deadline=dl).get(ref) == seen:
                raise  # refused, not raced (a prune deleting it): looking again would spin
        except SnapshotNotFoundError:
            if want == version:
                raise
            return  # not in dst yet: that version's own mirroring moves the ref


def check_copy(dst: BackedStore, name: str, version: str, dl: Deadline) -> None:
    """IntegrityError unless every pack and chunk of ``version`` in ``dst`` checks out."""
    report = maintenance.verify(dst, name, version, dl)
    if not report.ok:
        shown = "; ".join(report.problems[:3])
        more = f" (and {len(report.problems) - 3} more)" if len(report.problems) > 3 else ""
        raise IntegrityError(f"{name}/{version} in the destination: {shown}{more}")
