"""Refs on a backend: reading one (bounded in size, its signature checked, never older than
one already seen) and moving one by compare-and-swap, the one way a ref is written."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from chroma_snapshots.backends.base import Backend, GetResult, PutMode
from chroma_snapshots.engine.keys import ref_key
from chroma_snapshots.engine.models import RefValue, VersionId
from chroma_snapshots.engine.refvalue import MAX_GENERATION
from chroma_snapshots.engine.signing import Signer
from chroma_snapshots.engine.validation import MAX_REF_BYTES, check_name, utc_now
from chroma_snapshots.errors import (
    ConfigError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    SnapshotError,
    SnapshotNotFoundError,
    StoreNotFoundError,
)
from chroma_snapshots.stores.base import ANY, LATEST, Expected
from chroma_snapshots.stores.claims import moved_on_from, note_retired

log = logging.getLogger(__name__)
REPAIR = "a move with expected=ANY writes over it; CLI: rollback --force, tag --force"

Found = tuple[RefValue, str]
T = TypeVar("T")
"""A ref's value and the ETag a compare-and-swap is conditioned on."""


def read_ref(
    io: Backend, signer: Signer | None, seen: dict[str, int], name: str, ref: str
) -> Found | None:
    """The ref's value and ETag, or None if it does not exist. ``seen`` holds the highest
    generation read of each ref so far (the caller's, updated here)."""
    try:
        key = ref_key(check_name(name), check_name(ref, "ref name"))
        got = get_bounded(io, key, MAX_REF_BYTES, "ref")
    except StoreNotFoundError:
        raise  # no bucket: not an absent ref
    except SnapshotNotFoundError:
        return None
    except IntegrityError as e:  # too large
        raise _unreadable(key, e) from None
    try:
        value = RefValue.from_json(got.data)
        if signer is not None:
            signer.verify(f"ref:{key}", value.signed_bytes(), value.signature, f"ref {key}")
        # Every move of a ref raises its generation (a rollback too), so a lower one than
        # this store has seen is an old ref written back: a replay, even if validly signed.
        if value.generation < (last := seen.get(key, 0)):
            raise IntegrityError(
                f"ref {key} went backwards (generation {value.generation} after {last}): "
                "an old ref was written back"
            )
    except IntegrityError as e:
        raise _unreadable(key, e) from None
    seen[key] = value.generation
    return value, got.meta.etag


def _unreadable(key: str, e: IntegrityError) -> IntegrityError:
    """``e`` naming the ref, and how to write over it."""
    named = str(e) if key in str(e) else f"ref {key}: {e}"
    return IntegrityError(f"{named} ({REPAIR})")


def to_move(read: Callable[[], T], expected: Expected) -> T | None:
    """What ``read`` reads of the ref a move is conditioned on; with ``ANY``, None if it
    cannot be read: the move then writes over it (first_generation)."""
    try:
        return read()
    except IntegrityError as e:
        if expected is not ANY:
            raise
        log.warning("writing over a ref that cannot be read: %s", e)
        return None


class MoveWatch:
    """Around a call that moves a ref: set ``sent`` just before the move goes out; an error
    raised before then is marked ``ref_untouched`` (a cache then keeps serving, stale, what
    the ref named: an offline publish, refused at its first request, made it forget)."""

    def __init__(self) -> None:
        self.sent = False

    def __enter__(self) -> MoveWatch:
        return self

    def __exit__(self, kind: object, err: BaseException | None, tb: object) -> None:
        if isinstance(err, SnapshotError) and not self.sent:
            err.ref_untouched = True


def move_ref(
    io: Backend,
    signer: Signer | None,
    name: str,
    ref: str,
    version: str,
    expected: Expected,
    current: Found | None,
    reread: Callable[[], Found | None],
    rests_on: Callable[[str], bool] | None = None,
) -> None:
    """Point ``name``/``ref`` at ``version``, conditioned on ``current`` (what the caller
    read and checked against ``expected``); ConflictError if it moved since. ``reread``
    reads the ref again: a write answered with an error may still have landed, and was
    if the ref holds it, if a mover noted moving on from it, or (``rests_on``, for a new
    version) if what the ref names now descends from it."""
    check_signable(io, signer, name, ref, current)
    if current is not None and current[0].version != version:  # a reader's grace starts
        note_retired(io, name, current[0].version, ref, current[0].generation)
    # A ref made where none is (new, deleted, or unreadable and written over) starts
    # above any generation it had: one deleted and made again at 1 let every old signed
    # value of it be written back over the new one, to readers that had seen the new one.
    gen = current[0].generation + 1 if current else first_generation()
    if gen > MAX_GENERATION:  # readers would refuse the new value: the name would be wedged
        raise IntegrityError(
            f"ref {name}/{ref} is at generation {gen - 1}, the highest a ref may have: it was "
            "not written by this library; write it back by hand from a known version"
        )
    ref_value = RefValue(version, gen, utc_now())
    if signer is not None:
        sig = signer.sign(f"ref:{ref_key(name, ref)}", ref_value.signed_bytes())
        ref_value = replace(ref_value, signature=sig)
    value = ref_value.to_json()
    # ANY writes whatever the ref held, but over what was read: a generation is still
    # written by one compare-and-swap, so a racing move is a ConflictError, never a
    # silently dropped publish with two values at one generation. Only a ref that could
    # not be read (or is absent) is written blind, at first_generation.
    if current is not None:
        mode = PutMode.update(current[1])
    else:
        mode = PutMode.OVERWRITE if expected is ANY else PutMode.CREATE
    try:
        io.put(ref_key(name, ref), value, mode=mode)
    except ConflictError as e:
        now = reread()
        if now is not None and now[0].to_json() == value:
            return  # our own write, answered with an error and retried: it did land
        if moved_on_from(io, name, version, ref, gen):
            return  # it landed, and another mover has moved the ref on from it since
        if now is not None and rests_on is not None and rests_on(now[0].version):
            return  # it landed, and what followed was built on it
        raise ConflictError(
            f"{name}/{ref} moved while publishing (based on "
            f"{current[0].version if current else 'nothing'}); nothing was made visible"
        ) from e


def check_signable(
    io: Backend, signer: Signer | None, name: str, ref: str, current: Found | None
) -> None:
    """ConfigError if a store without a signing key would write an unsigned ref where a
    signed one is (``current``), or a new ref beside a signed ``latest``: every reader
    holding the key would then refuse the ref, and list, prune and sync the name no more."""
    if signer is not None:
        return
    if current is not None:
        signed = current[0].signature is not None
    else:
        signed = ref != "latest" and name_is_signed(io, name)
    if signed:
        raise unsigned_over_signed(f"ref {name}/{ref}" if current else f"{name}'s latest")


def name_is_signed(io: Backend, name: str) -> bool:
    """Whether ``name``'s ``latest`` carries a signature (False if it is absent or cannot
    be read: nothing then says the name is signed)."""
    try:
        got = get_bounded(io, ref_key(name, "latest"), MAX_REF_BYTES, "ref")
        return RefValue.from_json(got.data).signature is not None
    except (SnapshotNotFoundError, IntegrityError):
        return False


def unsigned_over_signed(what: str) -> ConfigError:
    """The refusal of :func:`check_signable` (and of a sync whose source is signed), said
    before anything is written."""
    return ConfigError(
        f"{what} is signed, and this store has no signing key: an unsigned ref would lock "
        "out every reader holding the key. Set CHROMA_SNAPSHOTS_SIGNING_KEY (signing_key=)"
    )


def first_generation() -> int:
    """The generation of a ref written where none could be read: new, deleted (by hand or by
    an attacker), damaged, or signed with another key (written over with ``ANY``). Readers
    remember the highest generation they saw and refuse a lower one, so it must be above
    any this ref had: the time in microseconds, which no ref reaches one move at a time (a
    move is a round trip of a millisecond or more), nor a ref made this way earlier from a
    machine whose clock was not ahead of this one's (a reader that saw that one refuses the
    new value as gone backwards until it restarts)."""
    return time.time_ns() // 1000


def check_expected(what: str, expected: Expected, current: Found | None) -> None:
    """ConflictError unless ``current`` is what ``expected`` says (None: no ref yet; a
    version id: that version; LATEST or ANY: whatever it is)."""
    check_expected_version(what, expected, None if current is None else current[0].version)


def check_expected_version(what: str, expected: Expected, current: str | None) -> None:
    """:func:`check_expected` of the version a ref names (None: no ref)."""
    if expected is None:
        if current is not None:
            raise ConflictError(f"{what} already exists (at {current}); expected none")
        return
    if expected is LATEST or expected is ANY:
        return  # nothing to compare before the write
    if not isinstance(expected, str):  # bytes, 0, True...: never a silent unconditional write
        raise InvalidInputError(
            f"{what}: expected must be a version id (str), None, LATEST or ANY, not "
            f"{type(expected).__name__}"
        )
    VersionId.parse(expected)
    if current != expected:
        raise ConflictError(f"{what} is at {current or 'nothing'}, not the expected {expected}")


def get_bounded(io: Backend, key: str, limit: int, what: str) -> GetResult:
    """``key`` if it holds at most ``limit`` bytes; IntegrityError otherwise, after reading
    no more than ``limit + 1`` of them (a hostile 5 GB ref costs 4 KiB of download)."""
    got = io.get(key, byte_range=(0, limit + 1))
    if got.meta.size > limit or len(got.data) > limit:
        size = max(got.meta.size, len(got.data))
        raise IntegrityError(f"{what} {key} is {size} bytes, more than the {limit} allowed")
    return got


def descends(version: str, ancestor: str, parent: Callable[[str], str | None]) -> bool:
    """Whether ``ancestor`` is on ``version``'s parent chain. Version ids sort by time and a
    parent is older than its child, so the walk stops at the first version older than
    ``ancestor``; a missing or unreadable manifest on the way ends it too (False)."""
    try:
        while version > ancestor:
            found = parent(version)
            if found is None:
                return False
            version = found
    except (SnapshotNotFoundError, IntegrityError):
        return False
    return version == ancestor
