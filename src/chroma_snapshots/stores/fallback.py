"""``FallbackStore``: read from the first store that answers in time (EFS, then S3).

Reads try each store with a share of the remaining deadline and the result
names the store that served it. A store is skipped when it

- times out (StorageTimeoutError: a hung mount, a stalled read),
- is unavailable (BackendUnavailableError: unreachable, refused, or its mount
  worker died during the call),
- lacks the version (SnapshotNotFoundError: a lagging mirror), or
- serves damaged or hostile data (IntegrityError: a bad hash or signature, an
  unparseable or absurd ref or manifest).

Refs, listings and names are the source of truth's: its "no such ref" is the answer (a
mirror's copy of a deleted tag is not), and a mirror answers only when the source of truth
fails, flagged stale (``read_current``, ``current_version``).

Everything else propagates from the first store: bad input (InvalidInputError,
ConfigError) and a lost compare-and-swap (ConflictError) would be the same on
every store, and a full local disk (CacheFullError) is not the store's fault.
Writes go to the source of truth (the last store unless told otherwise) and,
with ``mirror=True``, are copied to the other stores afterwards; a failed
mirror is logged and never fails the publish.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import SupportsIndex, TypeVar

from chroma_snapshots.backends.base import Backend
from chroma_snapshots.engine.apart import Place, keep_out, store_folder
from chroma_snapshots.engine.deadline import Deadline, DeadlineLike, as_deadline, within
from chroma_snapshots.engine.models import Manifest, RefValue, SnapshotInfo
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.retry import RetryPolicy
from chroma_snapshots.engine.transfer import Placement
from chroma_snapshots.engine.validation import check_flags, number_in
from chroma_snapshots.errors import (
    BackendUnavailableError,
    IntegrityError,
    InvalidInputError,
    SnapshotError,
    SnapshotNotFoundError,
    StorageTimeoutError,
    StoreNotFoundError,
    shown,
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
        primary: SupportsIndex = -1,
        mirror: bool = False,
        share: float = 0.5,
    ) -> None:
        _check_arguments(stores, primary, mirror, share)
        if len({s.trust for s in stores}) > 1:
            # a reader would accept from one store what another refuses (and a cache
            # keyed by the mix could serve one's data under the other's keys)
            raise InvalidInputError(
                "FallbackStore's stores verify with different signing keys: open every "
                f"store with the same keys ({[s.label for s in stores]})"
            )
        self.stores = list(stores)
        self.trust = self.stores[0].trust
        self.primary = self.stores[primary]
        self.mirror = mirror
        # (from, to) pairs a publish is copied along: from the source of truth to the others
        self._mirrors: list[tuple[BackedStore, BackedStore]] = []
        if mirror:
            backed = [s for s in self.stores if isinstance(s, BackedStore)]
            if len(backed) < len(self.stores):
                unbacked = [s.label for s in self.stores if not isinstance(s, BackedStore)]
                raise InvalidInputError(
                    f"mirror=True needs stores kept on a backend; not: {unbacked}"
                )
            first = backed[self.stores.index(self.primary)]
            self._mirrors = [(first, s) for s in backed if s is not first]
        self.share = share
        self.default_timeout = self.primary.default_timeout
        self.label = repr(self)
        self.identity = f"FallbackStore({', '.join(s.identity for s in self.stores)})"

    def __repr__(self) -> str:
        return f"FallbackStore({', '.join(s.label for s in self.stores)})"

    @property
    def folders(self) -> tuple[Place, ...]:
        return tuple(f for s in self.stores for f in s.folders)

    def _first(
        self,
        what: str,
        deadline: DeadlineLike,
        fn: Callable[[SourceStore, Deadline], T],
        *,
        truth_first: bool = False,
        stores: Sequence[SourceStore] | None = None,
    ) -> tuple[T, SourceStore]:
        """``fn`` on each store in turn until one answers. ``truth_first``: the source of
        truth is asked first and its "not found" is the answer, not a reason to ask a mirror."""
        dl = as_deadline(deadline, self.default_timeout)
        order = list(stores if stores is not None else self.stores)
        if truth_first:
            order = [self.primary, *(s for s in order if s is not self.primary)]
        last = len(order)

        def attempt(n: int) -> tuple[T, SourceStore]:
            store = order[n - 1]  # each store once, in order; the last gets what is left
            budget = dl if n == last else dl.child(dl.remaining() * self.share)
            try:
                return fn(store, budget), store
            except SnapshotNotFoundError as e:
                if truth_first and store is self.primary and not isinstance(e, StoreNotFoundError):
                    raise _Answer(e) from e
                raise

        failures: list[str] = []

        def failed(n: int, e: BaseException) -> None:
            label, kind = order[n - 1].label, type(e).__name__
            failures.append(f"{label}: {e}")
            log.warning("%s from %s failed (%s: %s); trying the next store", what, label, kind, e)

        try:
            return _FAILOVER.with_(attempts=last).call(attempt, retry_on=_SKIP, on_retry=failed)
        except _Answer as e:
            raise e.error from None
        except _SKIP as e:
            # the last store's error (every other one was retried), saying what each store
            # answered (an offline read named only the last store, as if the others had
            # not been asked)
            failures.append(f"{order[-1].label}: {e}")
            raise _restated(e, f"{what} failed on every store: {'; '.join(failures)}") from e

    # The source protocol CachedStore uses.

    def read_ref(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[RefValue, str] | None:
        return self.read_current(name, ref, deadline=deadline)[0]

    def read_current(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[tuple[RefValue, str] | None, SnapshotError | None]:
        """The source of truth's ref (None: it has none); when the source of truth fails,
        the first mirror's, with the failure that made it a stale answer. A mirror that
        lacks the ref cannot say more than the outage: the outage is raised."""
        dl = as_deadline(deadline, self.default_timeout)
        try:
            budget = dl.child(dl.remaining() * self.share)
            return self.primary.read_ref(name, ref, deadline=budget), None
        except _OUTAGE as e:
            outage: SnapshotError = e
            log.warning("read ref from %s failed (%s: %s); asking the mirrors (a stale answer)",
                        self.primary.label, type(e).__name__, e)  # fmt: skip
        mirrors = [s for s in self.stores if s is not self.primary]
        try:
            found, _ = self._first(
                "read ref",
                dl,
                lambda s, budget: _required(s.read_ref(name, ref, deadline=budget)),
                stores=mirrors,
            )
        except SnapshotError as e:
            said = f"{self.primary.label}: {outage}; and from the mirrors: {e}"
            raise _restated(outage, said) from None
        return found, outage

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
        dl = as_deadline(deadline, self.default_timeout)
        version = self.current_version(name, ref, deadline=dl)[0]  # the source of truth's
        return SnapshotInfo.from_manifest(version, self.load_manifest(name, version, deadline=dl))

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
        # from the source of truth; a mirror's answer when it does not answer: stale
        version, stale = self.current_version(name, ref, deadline=dl)
        snap, _ = self._first(
            "checkout",
            dl,
            lambda s, budget: s.checkout(name, version, dest, deadline=budget, progress=progress),
        )
        return replace(snap, stale=True) if stale else snap

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
        mirrors = self._known_mirrors(dl)
        with keep_out(store_folder(f) for f in self.folders):  # a mirror's too
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
        self._mirror(name, info.version, dl, mirrors=mirrors)
        return info

    def _known_mirrors(self, dl: Deadline) -> list[tuple[BackedStore, BackedStore]]:
        """The mirrors whose folders are known and marked, each asked now (within ``share``
        of the time left, and at most the backend's own short wait) if its mount has not
        answered since it opened. One that still does not, or whose marker cannot be
        written, is left out of this publish's mirroring: it could not take the copy
        anyway, and a source inside its folder is then never copied into it unchecked."""
        known = []
        for source, store in self._mirrors:
            step = "its folder is not known"
            try:
                share = dl.child(dl.remaining() * self.share)
                within(share, store.backend.folder)
                step = "its marker cannot be written"
                within(share, store.backend.mark)  # what the walk of the source refuses
            except (StorageTimeoutError, BackendUnavailableError) as e:
                log.warning("not mirroring to %s: %s (%s)", store.label, step, e)
                continue
            known.append((source, store))
        return known

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

    def _mirror(
        self,
        name: str,
        version: str,
        dl: Deadline,
        ref: str = "latest",
        mirrors: list[tuple[BackedStore, BackedStore]] | None = None,
    ) -> None:
        """Copy ``version`` (and ``ref``) to each mirror (``mirrors``: those given), each
        within ``share`` of the time left: the publish already stands, and a hung mirror
        must not hold its caller."""
        for source, store in self._mirrors if mirrors is None else mirrors:
            budget = dl.child(dl.remaining() * self.share)
            try:
                sync_version(source, store, name, version, ref=ref, deadline=budget, follow=True)
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


_OUTAGE = (StorageTimeoutError, BackendUnavailableError, IntegrityError, StoreNotFoundError)
"""What makes a mirror's ref worth asking for: the source of truth did not answer (or
answered with damage, or its bucket or folder is gone), as opposed to answering that the
ref does not exist."""


def _restated(error: SnapshotError, message: str) -> SnapshotError:
    """``error`` (its type and flags) with ``message``."""
    again = type(error)(message)
    again.ref_untouched = error.ref_untouched
    return again


class _Answer(Exception):
    """The source of truth's "not found": final, never a reason to ask a mirror."""

    def __init__(self, error: SnapshotNotFoundError) -> None:
        super().__init__(str(error))
        self.error = error


_FAILOVER = RetryPolicy(base=0.0, jitter=False)
"""The next store at once: failing over is not waiting for the same store to recover."""


def _required(found: tuple[RefValue, str] | None) -> tuple[RefValue, str]:
    # A mirror without the ref may just be behind: let the next store answer.
    if found is None:
        raise SnapshotNotFoundError("ref not found")
    return found


def _check_arguments(stores: object, primary: object, mirror: object, share: object) -> None:
    """InvalidInputError unless ``stores`` is a list or tuple (their order is the order
    they are tried in: a set has none) of two or more different source stores,
    ``primary`` an index into it, ``mirror`` a bool and ``share`` a fraction strictly
    between 0 and 1."""
    if not isinstance(stores, list | tuple) or len(stores) < 2:
        raise InvalidInputError(
            f"FallbackStore needs a list of two or more stores, in the order to try them, "
            f"not {shown(stores)}"
        )
    if odd := [repr(s) for s in stores if not isinstance(s, SourceStore)]:
        raise InvalidInputError(
            f"FallbackStore reads from source stores (RemoteStore, ...), not {odd}"
        )
    places = Counter(place for s in stores for place in set(_places(s)))
    if twice := [place for place, n in places.items() if n > 1]:
        shown_place = twice[0].replace("\0", " at ")  # s3_place's separator, for people
        raise InvalidInputError(
            f"FallbackStore's stores must be different stores: {shown_place} is among them "
            "twice (a fallback to the same storage is none)"
        )
    # an int, or what indexes as one (numpy's); True is no index
    if isinstance(primary, bool) or not isinstance(primary, SupportsIndex):
        raise InvalidInputError(f"FallbackStore's primary must be an index, not {shown(primary)}")
    index = operator.index(primary)
    if not -len(stores) <= index < len(stores):
        raise InvalidInputError(
            f"FallbackStore's primary={index} names none of its {len(stores)} stores"
        )
    check_flags({"mirror": mirror})
    if not number_in(share, 0, 1, low_ok=False) or share == 1:
        raise InvalidInputError(f"FallbackStore needs 0 < share < 1, not {shown(share)}")


def _places(store: SourceStore) -> list[str]:
    """The storage ``store`` reads: its identity and its backend's place (a label given by
    hand is an identity, not where the objects are), or its stores' if it combines some."""
    if isinstance(store, FallbackStore):
        return [place for s in store.stores for place in _places(s)]
    backend = getattr(store, "backend", None)
    return [store.identity, *([backend.place()] if isinstance(backend, Backend) else [])]
