"""``FallbackStore``: read from the first store that answers in time (EFS, then S3).

Reads try each store with a share of the remaining deadline and the result
names the store that served it. A store is skipped when it

- times out (StorageTimeoutError: a hung mount, a stalled read),
- is unavailable (BackendUnavailableError: unreachable, refused, or its mount
  worker died during the call),
- lacks the ref or version (SnapshotNotFoundError: a lagging mirror), or
- serves damaged or hostile data (IntegrityError: a bad hash or signature, an
  unparseable or absurd ref or manifest).

Everything else propagates from the first store: bad input (InvalidInputError,
ConfigError) and a lost compare-and-swap (ConflictError) would be the same on
every store, and a full local disk (CacheFullError) is not the store's fault.
Writes go to the source of truth (the last store unless told otherwise) and,
with ``mirror=True``, are copied to the other stores afterwards; a failed
mirror is logged and never fails the publish.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from chroma_snapshots.engine.deadline import Deadline, DeadlineLike, as_deadline
from chroma_snapshots.engine.models import Manifest, RefValue, SnapshotInfo, VersionId
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.retry import RetryPolicy
from chroma_snapshots.engine.transfer import Placement
from chroma_snapshots.errors import (
    BackendUnavailableError,
    IntegrityError,
    SnapshotError,
    SnapshotNotFoundError,
    StorageTimeoutError,
)
from chroma_snapshots.ops.sync import sync_version
from chroma_snapshots.stores.base import (
    LATEST,
    BackedStore,
    Expected,
    LocalSnapshot,
    PruneReport,
    SourceStore,
    VerifyReport,
)
from chroma_snapshots.stores.upload import ParentDir

log = logging.getLogger(__name__)
T = TypeVar("T")
# What makes a read move on to the next store (see the module docstring).
_SKIP = (StorageTimeoutError, BackendUnavailableError, SnapshotNotFoundError, IntegrityError)


class FallbackStore(SourceStore):
    """Reads data from ``stores`` in order; writes to ``stores[primary]``, the source of truth.

    Refs are read from the source of truth first: a mirror may be behind (a publish or a
    rollback it has not seen yet), so its refs answer only when the source of truth fails.
    Manifests and packs are immutable, so any store that has them serves them, the first
    in order first. ``share`` is the fraction of the remaining deadline each store but the
    last may spend before the next is tried.

    Any source store can be one of ``stores`` (a RemoteStore, another FallbackStore);
    ``mirror=True`` copies packs and manifests object by object, so it needs every store
    kept on a backend (as RemoteStores are).
    """

    def __init__(
        self,
        stores: Sequence[SourceStore],
        *,
        primary: int = -1,
        mirror: bool = False,
        share: float = 0.5,
    ) -> None:
        if len(stores) < 2 or not 0 < share < 1:
            raise ValueError("FallbackStore needs two or more stores and 0 < share < 1")
        self.stores = list(stores)
        self.trust = "+".join(s.trust for s in self.stores).strip("+")
        self.primary = self.stores[primary]
        self.mirror = mirror
        # (from, to) pairs a publish is copied along: from the source of truth to the others
        self._mirrors: list[tuple[BackedStore, BackedStore]] = []
        if mirror:
            backed = [s for s in self.stores if isinstance(s, BackedStore)]
            if len(backed) < len(self.stores):
                unbacked = [s.label for s in self.stores if not isinstance(s, BackedStore)]
                raise ValueError(f"mirror=True needs stores kept on a backend; not: {unbacked}")
            first = backed[self.stores.index(self.primary)]
            self._mirrors = [(first, s) for s in backed if s is not first]
        self.share = share
        self.default_timeout = self.primary.default_timeout
        self.label = repr(self)

    def __repr__(self) -> str:
        return f"FallbackStore({', '.join(s.label for s in self.stores)})"

    def _first(
        self,
        what: str,
        deadline: DeadlineLike,
        fn: Callable[[SourceStore, Deadline], T],
        *,
        truth_first: bool = False,
    ) -> tuple[T, SourceStore]:
        dl = as_deadline(deadline, self.default_timeout)
        stores = self.stores
        if truth_first:
            stores = [self.primary, *(s for s in self.stores if s is not self.primary)]
        last = len(stores)

        def attempt(n: int) -> tuple[T, SourceStore]:
            store = stores[n - 1]  # each store once, in order; the last gets what is left
            budget = dl if n == last else dl.child(dl.remaining() * self.share)
            return fn(store, budget), store

        def failed(n: int, e: BaseException) -> None:
            label, kind = stores[n - 1].label, type(e).__name__
            log.warning("%s from %s failed (%s: %s); trying the next store", what, label, kind, e)

        return _FAILOVER.with_(attempts=last).call(attempt, retry_on=_SKIP, on_retry=failed)

    # The source protocol CachedStore uses.

    def read_ref(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[RefValue, str] | None:
        try:
            found, _ = self._first(
                "read ref",
                deadline,
                lambda s, dl: _required(s.read_ref(name, ref, deadline=dl)),
                truth_first=True,
            )
        except SnapshotNotFoundError:
            return None
        return found

    def load_manifest(self, name: str, version: str, *, deadline: DeadlineLike = None) -> Manifest:
        m, _ = self._first(
            "load manifest", deadline, lambda s, dl: s.load_manifest(name, version, deadline=dl)
        )
        return m

    def materialize(
        self,
        name: str,
        job: Placement,
        dl: Deadline,
        stats: StatsRecorder,
        progress: Progress | None = None,
    ) -> str:
        label, _ = self._first(
            "materialize", dl, lambda s, budget: s.materialize(name, job, budget, stats, progress)
        )
        return label

    # SnapshotStore.

    def resolve(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> SnapshotInfo:
        fresh = not VersionId.is_version(ref)  # a ref may have moved; a version id cannot
        info, _ = self._first(
            "resolve", deadline, lambda s, dl: s.resolve(name, ref, deadline=dl), truth_first=fresh
        )
        return info

    def checkout(
        self,
        name: str,
        ref: str = "latest",
        dest: str | Path | None = None,
        *,
        deadline: DeadlineLike = None,
        progress: Progress | None = None,
    ) -> LocalSnapshot:
        dl = as_deadline(deadline, self.default_timeout)
        version = self.current_version(name, ref, deadline=dl)[0]  # from the source of truth
        snap, _ = self._first(
            "checkout",
            dl,
            lambda s, budget: s.checkout(name, version, dest, deadline=budget, progress=progress),
        )
        return snap

    def versions(self, name: str, *, deadline: DeadlineLike = None) -> Iterator[SnapshotInfo]:
        found, _ = self._first(
            "versions",
            deadline,
            lambda s, dl: list(s.versions(name, deadline=dl)),
            truth_first=True,
        )
        return iter(found)

    def names(self, *, deadline: DeadlineLike = None) -> Iterator[str]:
        found, _ = self._first(
            "names", deadline, lambda s, dl: list(s.names(deadline=dl)), truth_first=True
        )
        return iter(found)

    def refs(self, name: str, *, deadline: DeadlineLike = None) -> dict[str, str]:
        found, _ = self._first(
            "refs", deadline, lambda s, dl: s.refs(name, deadline=dl), truth_first=True
        )
        return found

    def verify(self, name: str, version: str, *, deadline: DeadlineLike = None) -> VerifyReport:
        return self.primary.verify(name, version, deadline=deadline)

    def publish(
        self,
        name: str,
        source_dir: str | Path,
        *,
        expected: Expected = LATEST,
        message: str | None = None,
        metadata: dict[str, object] | None = None,
        deadline: DeadlineLike = None,
        progress: Progress | None = None,
        allow_empty: bool = False,
        parent_dir: ParentDir = None,
    ) -> SnapshotInfo:
        dl = as_deadline(deadline, self.default_timeout)
        info = self.primary.publish(
            name,
            source_dir,
            expected=expected,
            message=message,
            metadata=metadata,
            deadline=dl,
            progress=progress,
            allow_empty=allow_empty,
            parent_dir=parent_dir,
        )
        self._mirror(name, info.version, dl)
        return info

    def set_ref(
        self,
        name: str,
        ref: str,
        version: str,
        *,
        expected: Expected,
        deadline: DeadlineLike = None,
    ) -> None:
        dl = as_deadline(deadline, self.default_timeout)
        self.primary.set_ref(name, ref, version, expected=expected, deadline=dl)
        self._mirror(name, version, dl, ref)

    def prune(
        self,
        name: str,
        *,
        keep_last: int = 10,
        min_age: float = 3600.0,
        dry_run: bool = False,
        deadline: DeadlineLike = None,
    ) -> PruneReport:
        return self.primary.prune(
            name, keep_last=keep_last, min_age=min_age, dry_run=dry_run, deadline=deadline
        )

    def _mirror(self, name: str, version: str, dl: Deadline, ref: str = "latest") -> None:
        for source, store in self._mirrors:
            try:
                sync_version(source, store, name, version, ref=ref, deadline=dl)
            except SnapshotError as e:
                log.warning(
                    "mirroring %s/%s to %s failed (%s); the publish stands",
                    name,
                    version,
                    store.label,
                    e,
                )

    def close(self) -> None:
        for store in self.stores:
            store.close()


_FAILOVER = RetryPolicy(base=0.0, jitter=False)
"""The next store at once: failing over is not waiting for the same store to recover."""


def _required(found: tuple[RefValue, str] | None) -> tuple[RefValue, str]:
    # A mirror without the ref may just be behind: let the next store answer.
    if found is None:
        raise SnapshotNotFoundError("ref not found")
    return found
