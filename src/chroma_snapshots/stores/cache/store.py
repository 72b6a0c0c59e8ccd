"""``CachedStore``: a SnapshotStore that keeps materialized versions in /tmp.

A warm Lambda container resolves ``latest`` with one small request (the ref)
and serves the folder it already has; a new version is built from chunks of
cached versions plus downloads of only the missing chunks; whatever a consumer
does to its checkout is detected (stamps) and repaired before the next one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from filelock import Timeout as LockTimeout

from chroma_snapshots.backends.registry_factories import expand_home
from chroma_snapshots.engine.apart import (
    CACHE_MARKER,
    KeptOut,
    Place,
    keep_out,
    mount_table,
    place_of,
)
from chroma_snapshots.engine.beneath import FolderId
from chroma_snapshots.engine.deadline import Deadline, DeadlineLike, as_deadline
from chroma_snapshots.engine.localfs import build_at, check_dest
from chroma_snapshots.engine.models import Manifest, SnapshotInfo
from chroma_snapshots.engine.placer import raise_local
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.validation import cache_dir_path, path_text, sha256_hex
from chroma_snapshots.errors import (
    ConfigError,
    InvalidInputError,
    SnapshotError,
    StorageTimeoutError,
    shown,
)
from chroma_snapshots.stores.base import (
    LATEST,
    Expected,
    LocalSnapshot,
    SourceStore,
)
from chroma_snapshots.stores.cache.builds import CacheBuilds
from chroma_snapshots.stores.cache.copies import (
    held_copy,
)
from chroma_snapshots.stores.cache.layout import check_links, check_trusted
from chroma_snapshots.stores.cache.pins import Pin
from chroma_snapshots.stores.cache.refmemory import CacheRefs
from chroma_snapshots.stores.cache.repair import find_damage
from chroma_snapshots.stores.cache.room import claim
from chroma_snapshots.stores.cache.space import NoRoom, check_settings
from chroma_snapshots.stores.delegating import DelegatingStore

Release = Callable[[], None] | None  # what a snapshot calls when it is released

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = "/tmp/chroma-snapshots"
DEFAULT_MIN_FREE = 64 << 20


def check_own_folder(cache: Path, stores: tuple[Place, ...]) -> None:
    """InvalidInputError if the cache's folder and a store's folder overlap (one is or
    holds the other, engine/apart.py): the cache's clean-ups would remove the store's
    files, or the store would list the cache's folders as snapshots. The stores' folders
    were looked at when they opened (theirs may be on a hung mount; the cache's folder is
    on a disk that answers); one on a mount that has not answered since is not known, and
    a cache over it still opens (to serve what it holds)."""
    if not stores:
        return
    mine, mounts = place_of(cache), mount_table()
    for store in stores:
        if mine.overlaps(store, mounts):
            raise InvalidInputError(
                f"the cache's folder {cache} and the store's folder {store.path} overlap: "
                f"give the cache a folder of its own"
            )


class CachedStore(CacheBuilds, CacheRefs, DelegatingStore):
    """Wraps a RemoteStore with a local cache of materialized versions.

    ``max_bytes`` caps the cache's size; ``min_free_bytes`` keeps that much of the
    disk free. ``stale_ok``: when the remote store can't be reached within
    ``stale_after`` seconds (default 3; half the time left if shorter), serve the version the
    asked ref named when it was last read, flagged ``stale=True``, if that version is
    cached; otherwise the outage's error is raised.
    ``refresh_seconds`` (read-consistency interval): trust what a ref named for that long
    before reading it again (None, the default: read it on every checkout).
    ``patch_in_place`` (default True; off with ``stale_ok``): build a new version by
    patching the newest cached version that no process pins and no ref names, which leaves
    the cache (stores/cache/patch.py); False keeps it and copies its unchanged bytes.
    """

    def __init__(
        self,
        inner: SourceStore,
        cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR,
        *,
        max_bytes: int | None = None,
        min_free_bytes: int = DEFAULT_MIN_FREE,
        stale_ok: bool = False,
        refresh_seconds: float | None = None,
        patch_in_place: bool = True,
        stale_after: float = 3.0,
    ) -> None:
        super().__init__(inner)
        self.inner: SourceStore = inner
        # One folder per store and per trust: a signed store must not be served what an
        # unsigned one cached from the same URL (unsigned caches keep their old folder).
        if not isinstance(inner, SourceStore):
            raise InvalidInputError(
                f"CachedStore reads from a source store (RemoteStore, FallbackStore, "
                f"DelegatingSourceStore), not {type(inner).__name__}"
            )
        folder = cache_folder(cache_dir)
        check_own_folder(folder, inner.folders)
        identity = inner.identity + (f"\0{inner.trust}" if inner.trust else "")
        # a path that is no UTF-8 (a folder named in other bytes) keys its own folder too
        self.root = folder / sha256_hex(identity.encode("utf-8", "surrogateescape"))[:16]
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        flags = {"stale_ok": stale_ok, "patch_in_place": patch_in_place}
        check_settings(max_bytes, min_free_bytes, refresh_seconds, stale_after, flags)
        self.stale_ok, self.stale_after = stale_ok, stale_after
        self.refresh_seconds = refresh_seconds
        self.patch_in_place = patch_in_place
        self._refs_read: dict[tuple[str, str], tuple[str, float]] = {}  # -> version, when
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._mlock = threading.Lock()
        try:
            # ours alone whatever the umask (0775 under umask 002 would then be refused)
            check_links(folder)
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.root.mkdir(mode=0o700, exist_ok=True)
            except (FileExistsError, NotADirectoryError):  # a file (or /dev/null) in the way
                raise InvalidInputError(
                    f"cache folder {folder}: a file is in the way of it: name a folder"
                ) from None
            check_trusted(folder, self.root)
            # no checkout goes below it, and no publish takes a source holding it
            if not (self.root / CACHE_MARKER).exists():
                (self.root / CACHE_MARKER).touch()
            self.clean_leftovers()
        except OSError as e:  # e.g. a read-only cache dir: locks cannot be taken
            raise_local(e, self.root, "opening the cache")
            raise

    def __repr__(self) -> str:
        return f"CachedStore({self.inner!r}, {str(self.root)!r})"

    # Checkout.

    def checkout(
        self,
        name: str,
        ref: str = "latest",
        dest: str | Path | None = None,
        *,
        deadline: DeadlineLike = None,
        progress: Progress | None = None,
    ) -> LocalSnapshot:
        """Serve a cached version (one ref request when warm) or materialize it incrementally.

        Without ``dest`` the cached folder itself is returned, pinned until released;
        with ``dest`` a private copy is made there.
        """
        dl = as_deadline(deadline, self.inner.default_timeout)
        t0, stats = time.monotonic(), StatsRecorder()
        if dest is not None:
            dest = check_dest(dest)  # before any Path(dest): "" would be the working dir
        d = self.dirs(name)
        version, stale, only_cached = self._current_version(name, ref, dl, stats)

        def snapshot(m: Manifest, path: Path, release: Release, source: str) -> LocalSnapshot:
            info, took = SnapshotInfo.from_manifest(version, m), time.monotonic() - t0
            return LocalSnapshot(path, info, stats.freeze(took), stale=stale, source=source,
                                 _release=release)  # fmt: skip

        try:
            # Held while completeness is checked and the meta read: evict needs it too.
            with d.lock(version).acquire(timeout=max(dl.remaining(), 0.001)):
                shared = self._shared(name, version, dl, stats)
                if shared is None:
                    manifest, source = self._serve(name, version, only_cached, dl, stats, progress)
                    d.touch(version)
                    pin = d.pin(version)
            if shared is not None:  # another holder: a copy of our own, both isolated (built
                # outside the lock: the holder keeps the folder, every chunk read is verified)
                made = partial(snapshot, shared)
                return self._held_copy(name, version, shared, dest, dl, stats, made)
        except LockTimeout as e:
            raise StorageTimeoutError(f"waited too long for the cache lock of {version}") from e
        except NoRoom:
            if dest is None:
                raise
            log.info("%s %s does not fit the cache: checking it out to %s directly", name,
                     version, dest)  # fmt: skip
            snap = self.inner.checkout(name, version, dest, deadline=dl, progress=progress)
            return replace(snap, stale=stale)
        except OSError as e:  # writing the version, repairing it, a copy, a lock or pin file
            raise_local(e, self.root, f"serving {version} from the cache")
            raise
        path = d.tree(version)

        def unpin() -> None:
            pin.unlink(missing_ok=True)

        if dest is None:
            try:  # a Ctrl-C before the caller has it: no one would let go of the pin
                return snapshot(manifest, path, unpin, source)
            except BaseException:
                unpin()
                raise
        try:  # a copy of its own: the shared folder is not held after it; through the
            # placer, from the files whose stamps hold, the rest verified
            made = partial(snapshot, manifest)
            return self._held_copy(name, version, manifest, dest, dl, stats, made, ours=True)
        finally:
            unpin()

    def resolve(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> SnapshotInfo:
        """Like the store's, with the version's manifest from the cache when it is cached and,
        with ``stale_ok``, the version this cache last saw ``ref`` name when the store does not
        answer (as :meth:`checkout` serves it)."""
        dl = as_deadline(deadline, self.inner.default_timeout)
        version = self._current_version(name, ref, dl, StatsRecorder())[0]
        return SnapshotInfo.from_manifest(version, self.load_manifest(name, version, deadline=dl))

    def load_manifest(self, name: str, version: str, *, deadline: DeadlineLike = None) -> Manifest:
        """The cached copy's manifest when the version is cached, else the store's."""
        cached = self.cached_manifest(name, version)
        return (
            cached
            if cached is not None
            else self.inner.load_manifest(name, version, deadline=deadline)
        )

    def current_version(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[str, bool]:
        """The version ``ref`` names, with one small request (the ref), and whether it is a
        stale answer from the cache (``stale_ok`` and the store did not answer)."""
        dl = as_deadline(deadline, self.inner.default_timeout)
        version, stale, _ = self._current_version(name, ref, dl, StatsRecorder())
        return version, stale

    def set_ref(
        self,
        name: str,
        ref: str,
        version: str,
        *,
        expected: Expected,
        deadline: DeadlineLike = None,
    ) -> None:
        """As the inner store's; this cache then knows where ``ref`` points."""
        with self._moving(name, ref):
            self.inner.set_ref(name, ref, version, expected=expected, deadline=deadline)
        self._saw(name, ref, version)

    def _shared(
        self, name: str, version: str, dl: Deadline, stats: StatsRecorder
    ) -> Manifest | None:
        """The manifest of ``version`` if another live checkout holds its folder: this
        checkout must then neither repair it, nor share it (chroma writes to what it opens),
        nor replace it, even if its meta is gone (the manifest then comes from the store)."""
        if not self.dirs(name).pinned(version):
            return None
        if (m := self.cached_manifest(name, version)) is not None:
            return m
        stats.add(requests=1)
        return self.inner.load_manifest(name, version, deadline=dl)

    def _held_copy(
        self,
        name: str,
        version: str,
        manifest: Manifest,
        dest: str | Path | None,
        dl: Deadline,
        stats: StatsRecorder,
        snapshot: Callable[[Path, Release, str], LocalSnapshot],
        ours: bool = False,
    ) -> LocalSnapshot:
        """``snapshot(path, release, source)`` for a private copy of ``version``
        (:meth:`_from_cache`: a holder may be writing, and every chunk is verified as it is
        read; with ``ours``, this checkout pins it and the files whose stamps hold are
        copied unread): at ``dest`` (taken back if ``snapshot`` fails), or in the cache,
        removed at release."""
        source = ["cache"]

        def build(work: Path, made: FolderId) -> None:
            source[0] = self._from_cache(
                name, version, manifest, (work, made), dl, stats, stamped=ours
            )

        if dest is not None:
            return build_at(
                Path(dest), build, "copying to dest", dl, lambda p: snapshot(p, None, source[0])
            )
        d = self.dirs(name)
        with self._room(dl):  # CacheFullError up front; the copy's pin claims its room
            self._make_room(manifest.total_size, keep=(name, version))
            pin = claim(d.copies() / ".pins", d, manifest.total_size)
        path, release = held_copy(d, version, pin, build, dl)
        return snapshot(path, release, source[0])

    def _serve(
        self,
        name: str,
        version: str,
        only_cached: SnapshotError | None,
        dl: Deadline,
        stats: StatsRecorder,
        progress: Progress | None,
    ) -> tuple[Manifest, str]:
        """With the version's lock held: the cached copy, repaired, or a new one."""
        manifest = self.cached_manifest(name, version)
        if manifest is not None:
            source = self._repair(name, version, manifest, dl, stats)
        elif only_cached is not None:
            raise only_cached  # evicted since the stale answer was chosen: nothing to serve
        else:
            self.dirs(name).discard(version)  # what a damaged entry left, if anything
            manifest = self.inner.load_manifest(name, version, deadline=dl)
            stats.add(requests=1)
            source = self._materialize(name, version, manifest, dl, stats, progress)
        # Late: the version stays cached (the next call is served from it), but this call
        # does not succeed past its deadline.
        dl.check(f"serving {version} (kept in the cache)")
        return manifest, source

    def hold(self, name: str, version: str, timeout: float = 0.0) -> tuple[Manifest, Pin] | None:
        """Pin a complete version so that no process evicts it: its manifest and the pin
        (unlink it to let go), or None if it is not cached or its lock stays busy for
        ``timeout`` seconds. The timeout is checked as a deadline's (a finite number of
        seconds, at most 1e9) and may not be negative: the lock library reads a negative
        timeout as "wait forever"."""
        d = self.version_dirs(name, version)
        try:
            wait = Deadline(timeout)  # NaN, inf, a bool or a str: InvalidInputError
            if timeout < 0:
                raise InvalidInputError(f"it must be 0 or more seconds, not {timeout}")
        except InvalidInputError as e:  # named: the caller passed no deadline
            raise InvalidInputError(f"hold's timeout: {e}") from None
        try:
            with d.lock(version).acquire(timeout=wait.remaining()):
                m = self.cached_manifest(name, version)
                return None if m is None else (m, d.pin(version))
        except LockTimeout:
            return None

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
    ) -> SnapshotInfo:
        """As the inner store's, handing it this cache's copy of the parent version, so
        that it can store changed chunks as deltas against it; this cache then knows
        what latest names."""
        mine = KeptOut(place_of(self.root.parent), "the cache's folder", both_ways=False)
        with keep_out([mine]), self._moving(name, "latest"):
            info = self.inner.publish(
                name, source_dir, expected=expected, message=message, metadata=metadata,
                deadline=deadline, progress=progress, parent_dir=partial(self._cached_tree, name),
                allow_empty=allow_empty,
            )  # fmt: skip
        self._saw(name, "latest", info.version)
        return info

    def _cached_tree(self, name: str, version: str) -> Path | None:
        """A complete cached copy of ``version`` (unpinned: reads from it are verified)."""
        d = self.dirs(name)
        return d.tree(version) if d.is_complete(version) else None

    def _repair(
        self, name: str, version: str, manifest: Manifest, dl: Deadline, stats: StatsRecorder
    ) -> str:
        """Undo whatever consumers did to a cached tree, in place: extra files go, changed
        files get their size and mode back, and only chunks whose bytes differ are
        rewritten (from other cached versions where they verify, else downloaded)."""
        d, check = self.dirs(name), partial(dl.check, "checking the cached files")
        check()  # after decoding the cached manifest, and (in find_damage) its stamps
        tree = d.tree(version)
        changed, chunks = find_damage(tree, manifest, d.read_stamps(version), check)
        if not changed:
            return "cache"
        log.warning("cached %s/%s was modified (%d files); repairing", name, version, changed)
        source = "cache"
        if chunks:
            source = self._from_cache(name, version, manifest, (tree, None), dl, stats, chunks)
        d.write_stamps(version, tree, manifest)
        return source


def cache_folder(cache_dir: object) -> Path:
    """``CachedStore``'s ``cache_dir``, held to the rule of ``StoreConfig.cache_dir``,
    ``--cache-dir`` and ``CHROMA_SNAPSHOTS_CACHE_DIR`` (an absolute path: validation.
    cache_dir_path), after a leading ``~`` or ``~user`` is expanded as in a store's path;
    else InvalidInputError. ``""`` and a relative path put the cache in the working
    directory, and ``~/x`` made a folder named ``~`` there."""
    path = path_text(cache_dir)
    if path is not None and path.startswith("~") and "\0" not in path:
        try:
            path = expand_home(path)
        except ConfigError:
            msg = f"cache_dir={shown(cache_dir)}: its ~ names no home folder (no HOME, no user)"
            raise InvalidInputError(msg) from None
    return Path(cache_dir_path(cache_dir if path is None else path, "cache_dir"))
