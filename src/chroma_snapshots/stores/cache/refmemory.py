"""What a cache remembers of refs: what each ref named when this cache last read (or moved)
it, so that a stale or offline answer serves that and nothing else, and what this process
read recently (the read-consistency interval)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.models import VersionId
from chroma_snapshots.engine.progress import StatsRecorder
from chroma_snapshots.engine.validation import check_name
from chroma_snapshots.errors import (
    BackendUnavailableError,
    SnapshotError,
    SnapshotNotFoundError,
    StorageTimeoutError,
)
from chroma_snapshots.stores.base import SourceStore
from chroma_snapshots.stores.cache.space import CacheSpace

log = logging.getLogger(__name__)

STALE_SHARE = 0.5  # of a deadline shorter than stale_after, what the ref may wait for


class CacheRefs(CacheSpace):
    """The refs half of a CachedStore (see its ``stale_ok``, ``stale_after`` and
    ``refresh_seconds``)."""

    inner: SourceStore
    stale_ok: bool
    stale_after: float
    refresh_seconds: float | None
    _refs_read: dict[tuple[str, str], tuple[str, float]]

    def _current_version(
        self, name: str, ref: str, dl: Deadline, stats: StatsRecorder
    ) -> tuple[str, bool, SnapshotError | None]:
        """The version to serve, whether the answer is stale, and for the version this
        cache last saw the ref name (served stale: nothing else may be), the outage to
        raise if that version is no longer cached. A ref that is neither a ref name nor a
        version id is InvalidInputError, as the store's (the cache's checkout starts here)."""
        if VersionId.is_version(check_name(ref, "ref name")):
            return ref, False, None
        if (recent := self.recent_ref(name, ref)) is not None:
            return recent, False, None
        wait = dl
        if self.stale_ok and self.dirs(name).recorded_ref(ref) is not None:
            # a store that hangs costs this, not the deadline: at most half the time left,
            # the rest being for serving the cached copy (a whole short deadline spent
            # waiting left nothing to serve it with)
            wait = dl.child(min(self.stale_after, dl.remaining() * STALE_SHARE))
        try:
            found, outage = self.inner.read_current(name, ref, deadline=wait)
            stats.add(requests=1)
        except (BackendUnavailableError, StorageTimeoutError) as e:
            if (version := self._last_seen(name, ref, e)) is None:
                raise  # never another version than the one this ref was last seen to name
            return version, True, e
        if outage is not None:  # a mirror answered for a source of truth that did not
            # What this cache last read from the source of truth wins (a mirror may have
            # missed a rollback); else the mirror's answer, flagged stale and not recorded.
            if (version := self._last_seen(name, ref, outage)) is not None:
                return version, True, outage
            if found is None:
                raise outage
            log.warning(
                "serving %s/%s for %r from a mirror, stale: the source of truth did "
                "not answer (%s)",
                name,
                found[0].version,
                ref,
                type(outage).__name__,
            )
            return found[0].version, True, None
        self._saw(name, ref, None if found is None else found[0].version)
        if found is None:
            raise SnapshotNotFoundError(f"{name}: no ref {ref!r}")
        return found[0].version, False, None

    def _saw(self, name: str, ref: str, version: str | None) -> None:
        """Note what the source of truth said ``ref`` names now (read, or moved by this
        cache): a stale or offline answer later serves that, never what it named before."""
        self.dirs(name).record_ref(ref, version)
        if version is not None:
            self._refs_read[(name, ref)] = (version, time.monotonic())

    @contextmanager
    def _moving(self, name: str, ref: str) -> Iterator[None]:
        """Around a move of ``ref`` made through this cache: forget what this cache knew of
        ``ref`` before the move is sent, on disk, and remember it again only if the move
        failed before anything was written (a documented error other than an outage, or
        one raised before the move was sent: ``SnapshotError.ref_untouched``). A
        move whose outcome is unknown (no answer in time, or this process killed while
        waiting) may have landed, so a stale read may serve neither the old version (that
        would undo a rollback) nor the new one: the outage is raised instead."""
        d = self.dirs(name)
        before = d.recorded_ref(ref)
        token = d.forget_ref(ref)
        self._refs_read.pop((name, ref), None)
        try:
            yield
        except SnapshotError as e:
            # a conflict, a refused input, or an outage before the move was sent (offline,
            # the first request refused): it made nothing visible; unless another move
            # through this cache came in between, whose knowledge wins
            if e.ref_untouched or not isinstance(e, (BackendUnavailableError, StorageTimeoutError)):
                d.restore_ref(ref, token, before)
            raise

    def _last_seen(self, name: str, ref: str, why: BaseException) -> str | None:
        """With ``stale_ok``, the version ``ref`` named when this cache last read it from
        the source of truth, if that version is cached (logged with ``why``, the store's
        error: it is served stale, and offline is not an outage)."""
        d = self.dirs(name)
        version = d.recorded_ref(ref) if self.stale_ok else None
        if version is None or not d.is_complete(version):
            return None
        reason = str(why).splitlines()[0] if str(why) else type(why).__name__
        log.warning("serving cached %s/%s for %r stale: %s", name, version, ref, reason)
        return version

    def recent_ref(self, name: str, ref: str = "latest") -> str | None:
        """The version ``ref`` named when this process read it less than ``refresh_seconds``
        ago (the read-consistency interval), or None: read it again (always, when
        ``refresh_seconds`` is None; ``math.inf`` reads it once per process)."""
        seen = self._refs_read.get((name, ref))
        if self.refresh_seconds is None or seen is None:
            return None
        return seen[0] if time.monotonic() - seen[1] < self.refresh_seconds else None
