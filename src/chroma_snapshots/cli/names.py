"""How the CLI reads a NAME and a REF: a name without a snapshot is "not found" in the same
words everywhere, and a version can be given by a unique prefix of its id (like git)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from chroma_snapshots.backends.base import Backend
from chroma_snapshots.engine.models import VersionId
from chroma_snapshots.errors import InvalidInputError, SnapshotError, SnapshotNotFoundError
from chroma_snapshots.ops.maintenance import list_versions

if TYPE_CHECKING:
    from chroma_snapshots.stores.base import SnapshotStore

# What could start a version id (20261202T071408883463Z-104f320cc9d1) or its digest; four
# characters at least, so a short word is always read as a ref name.
_PREFIX = re.compile(r"[0-9a-f][0-9a-fTZ-]{3,}")
_SHORT = re.compile(r"[0-9a-f]{1,3}")


def no_snapshot(name: str) -> SnapshotNotFoundError:
    """The one message for a name that has no snapshot."""
    return SnapshotNotFoundError(f"no snapshot named {name!r} in this store")


def version_ids(store: SnapshotStore, name: str) -> list[str]:
    """Version ids of ``name``, newest first: one listing where the store (or the store a
    cache wraps) sits on a backend, else from the versions' manifests."""
    inner = getattr(store, "inner", store)
    backend = getattr(inner, "backend", None)
    if isinstance(backend, Backend):
        return list(list_versions(backend, name))
    return [v.version for v in store.versions(name)]


def has_snapshot(store: SnapshotStore, name: str) -> bool:
    """Whether ``name`` has a ref or a version (True when that cannot be told: the caller's
    own error then stands)."""
    try:
        return bool(store.refs(name)) or bool(version_ids(store, name))
    except SnapshotError:
        return True


@contextmanager
def about(store: SnapshotStore, name: str) -> Iterator[None]:
    """A SnapshotNotFoundError in the block becomes "no snapshot named NAME" when the name
    has nothing at all (rather than "no ref 'latest'")."""
    try:
        yield
    except SnapshotNotFoundError as e:
        if not has_snapshot(store, name):
            raise no_snapshot(name) from e
        raise


def resolve_ref(store: SnapshotStore, name: str, ref: str) -> str:
    """``ref`` itself (a ref name or a full version id), or the one version id it is a
    prefix of (of the whole id or of its digest). Ambiguous: InvalidInputError naming the
    candidates; a prefix of nothing: SnapshotNotFoundError."""
    if _SHORT.fullmatch(ref) and ref not in store.refs(name):
        raise SnapshotNotFoundError(
            f"{name}: no ref {ref!r} (a version prefix needs at least 4 characters)"
        )
    if VersionId.is_version(ref) or not _PREFIX.fullmatch(ref) or ref in store.refs(name):
        return ref
    ids = version_ids(store, name)
    found = [v for v in ids if matches_prefix(v, ref)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise (
            no_snapshot(name)
            if not ids
            else SnapshotNotFoundError(f"{name}: no ref or version {ref!r}")
        )
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    raise InvalidInputError(
        f"{ref!r} is ambiguous: {len(found)} versions of {name} start with it ({shown}); "
        "give more characters"
    )


def matches_prefix(version: str, prefix: str) -> bool:
    """``prefix`` starts the version id ``version`` or its digest."""
    return version.startswith(prefix) or version.split("-", 1)[-1].startswith(prefix)


def check_new_tag(store: SnapshotStore, name: str, tag: str) -> None:
    """Refuse a new tag that is also the start of a version's id or digest: a ref is read
    before a prefix, so the tag would silently hide that version (git: "refname is
    ambiguous")."""
    if not _PREFIX.fullmatch(tag):
        return
    hidden = [v for v in version_ids(store, name) if matches_prefix(v, tag)]
    if hidden:
        raise InvalidInputError(
            f"tag {tag!r} is also the start of version {hidden[0]}"
            + (f" (and {len(hidden) - 1} more)" if len(hidden) > 1 else "")
            + ": it would hide that version; pick a name that is not a version prefix"
        )
