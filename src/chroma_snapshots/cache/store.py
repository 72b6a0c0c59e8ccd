"""``CachedStore``: a SnapshotStore that keeps materialized versions in /tmp.

A warm Lambda container resolves ``latest`` with one small request (the ref)
and serves the folder it already has; a new version is built from chunks of
cached versions plus downloads of only the missing chunks; whatever a consumer
does to its checkout is detected (stamps) and repaired before the next one.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from filelock import Timeout as LockTimeout

from ..deadline import Deadline, DeadlineLike, as_deadline
from ..errors import (
    BackendUnavailableError,
    CacheFullError,
    SnapshotNotFoundError,
    StorageTimeoutError,
)
from ..models import Manifest, SnapshotInfo, VersionId
from ..store import (
    DelegatingStore,
    LocalSnapshot,
    Progress,
    SourceStore,
    StatsRecorder,
    prepare_dest,
    remove_tree,
)
from ..transfer import LocalChunks
from ..validation import check_name, sha256_hex
from .layout import NameDirs, stamp_of
from .repair import damaged_chunks, remove_extras

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = "/tmp/chroma-snapshots"
DEFAULT_MIN_FREE = 64 << 20
_REUSE_FROM = 3  # newest cached versions offered as local chunk sources


class CachedStore(DelegatingStore):
    """Wraps a RemoteStore with a local cache of materialized versions.

    ``max_bytes`` caps the cache's size; ``min_free_bytes`` keeps that much of the
    disk free. ``stale_ok`` serves the newest cached version, flagged
    ``stale=True``, when the remote store can't be reached within the deadline.
    """

    def __init__(
        self,
        inner: SourceStore,
        cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR,
        *,
        max_bytes: int | None = None,
        min_free_bytes: int = DEFAULT_MIN_FREE,
        stale_ok: bool = False,
    ) -> None:
        super().__init__(inner)
        self.inner: SourceStore = inner
        self.root = Path(cache_dir) / sha256_hex(inner.label.encode())[:16]
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.stale_ok = stale_ok
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._mlock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_leftovers()

    def __repr__(self) -> str:
        return f"CachedStore({self.inner!r}, {str(self.root)!r})"

    def dirs(self, name: str) -> NameDirs:
        """The cache folders of ``name``."""
        return NameDirs(self.root / check_name(name))

    def cached_names(self) -> list[str]:
        """Names with anything in the cache."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

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
        d = self.dirs(name)
        version, stale = self._current_version(name, ref, dl, stats)
        try:
            with d.lock(version).acquire(timeout=max(dl.remaining(), 0.001)):
                if d.is_complete(version):
                    manifest = self._manifest(d, name, version)
                    source = self._repair(name, version, manifest, dl, stats)
                else:
                    manifest = self.inner.load_manifest(name, version, deadline=dl)
                    stats.add(requests=1)
                    source = self._materialize(name, version, manifest, dl, stats, progress)
                d.touch(version)
                pin = d.pin(version)
        except LockTimeout as e:
            raise StorageTimeoutError(f"waited too long for the cache lock of {version}") from e
        info = SnapshotInfo.from_manifest(version, manifest)
        if dest is not None:
            try:
                path = _private_copy(d.tree(version), Path(dest))
            finally:
                pin.unlink(missing_ok=True)
            return LocalSnapshot(
                path, info, stats.freeze(time.monotonic() - t0), stale=stale, source=source
            )
        return LocalSnapshot(
            d.tree(version),
            info,
            stats.freeze(time.monotonic() - t0),
            stale=stale,
            source=source,
            _release=lambda: pin.unlink(missing_ok=True),
        )

    def current_version(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[str, bool]:
        """The version ``ref`` names, with one small request (the ref), and whether it is a
        stale answer from the cache (``stale_ok`` and the store did not answer)."""
        dl = as_deadline(deadline, self.inner.default_timeout)
        return self._current_version(name, ref, dl, StatsRecorder())

    def _current_version(
        self, name: str, ref: str, dl: Deadline, stats: StatsRecorder
    ) -> tuple[str, bool]:
        if VersionId.is_version(ref):
            return ref, False
        try:
            found = self.inner.read_ref(name, ref, deadline=dl)
            stats.add(requests=1)
        except (BackendUnavailableError, StorageTimeoutError) as e:
            if not self.stale_ok:
                raise
            cached = self.dirs(name).complete()
            if not cached:
                raise BackendUnavailableError(
                    f"{name}: store unreachable and nothing cached"
                ) from e
            log.warning(
                "serving cached %s/%s stale: the store did not answer (%s)",
                name,
                cached[-1],
                type(e).__name__,
            )
            return cached[-1], True
        if found is None:
            raise SnapshotNotFoundError(f"{name}: no ref {ref!r}")
        return found[0].version, False

    def _manifest(self, d: NameDirs, name: str, version: str) -> Manifest:
        with self._mlock:
            m = self._manifests.get((name, version))
        if m is None:
            m = d.read_manifest(version)
            with self._mlock:
                self._manifests[(name, version)] = m
        return m

    def _local_chunks(self, name: str, exclude: str) -> LocalChunks:
        d = self.dirs(name)
        local = LocalChunks()
        for v in [v for v in d.complete() if v != exclude][-_REUSE_FROM:]:
            local.add_tree(d.tree(v), self._manifest(d, name, v))
        return local

    def _materialize(
        self,
        name: str,
        version: str,
        manifest: Manifest,
        dl: Deadline,
        stats: StatsRecorder,
        progress: Progress | None,
    ) -> str:
        d = self.dirs(name)
        self._make_room(manifest.total_size, keep=(name, version))
        work = d.work_dir(version)
        try:
            source = self.inner.materialize(
                name, manifest, work, dl, stats, progress, local=self._local_chunks(name, version)
            )
            d.write_meta(version, work, manifest)
            (d.root / "versions").mkdir(exist_ok=True)
            os.replace(work, d.tree(version))
        except OSError as e:
            remove_tree(work)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFullError(f"cache {self.root}: disk full while writing {version}") from e
            raise
        except BaseException:
            remove_tree(work)
            raise
        with self._mlock:
            self._manifests[(name, version)] = manifest
        return source

    def _repair(
        self, name: str, version: str, manifest: Manifest, dl: Deadline, stats: StatsRecorder
    ) -> str:
        """Undo whatever consumers did to a cached tree, in place: extra files go, changed
        files get their size and mode back, and only chunks whose bytes differ are
        rewritten (from other cached versions where they verify, else downloaded)."""
        d = self.dirs(name)
        tree = d.tree(version)
        stamps = d.read_stamps(version)
        bad = [
            f.path
            for f in manifest.files
            if stamps.get(f.path) is None
            or stamp_of(tree / f.path) != stamps[f.path]
            or stamps[f.path][0] != f.size
            or stamps[f.path][2] != f.mode
        ]
        remove_extras(tree, manifest)
        if not bad:
            return "cache"
        log.warning("cached %s/%s was modified (%d files); repairing", name, version, len(bad))
        by_path = {f.path: f for f in manifest.files}
        damaged = {p: idx for p in bad if (idx := damaged_chunks(tree, manifest, by_path[p]))}
        source = "cache"
        if damaged:
            local = self._local_chunks(name, version)
            local.add_tree(tree, manifest)  # intact copies of a chunk elsewhere in this tree
            source = self.inner.materialize(
                name, manifest, tree, dl, stats, local=local, damaged=damaged
            )
        d.write_stamps(version, tree, manifest)
        return source

    # Space.

    def usage(self) -> int:
        """Bytes of complete cached versions (from their manifests)."""
        return sum(
            self._manifest(self.dirs(n), n, v).total_size
            for n in self.cached_names()
            for v in self.dirs(n).complete()
        )

    def _make_room(self, need: int, keep: tuple[str, str]) -> None:
        entries = sorted(
            (self.dirs(n).last_used(v), n, v)
            for n in self.cached_names()
            for v in self.dirs(n).complete()
            if (n, v) != keep
        )
        usage = self.usage()
        free = shutil.disk_usage(self.root).free
        for _, n, v in entries:
            if not self._too_full(need, usage, free):
                return
            size = self._manifest(self.dirs(n), n, v).total_size
            if self.evict(n, v):
                usage, free = usage - size, free + size
        if self._too_full(need, usage, free):
            raise CacheFullError(
                f"cache {self.root} cannot hold {need} more bytes (using {usage}, {free} free, "
                f"max_bytes={self.max_bytes}, min_free_bytes={self.min_free_bytes}) even after "
                "evicting every unpinned version"
            )

    def _too_full(self, need: int, usage: int, free: int) -> bool:
        over_cap = self.max_bytes is not None and usage + need > self.max_bytes
        return over_cap or free - need < self.min_free_bytes

    def evict(self, name: str, version: str) -> bool:
        """Remove a cached version unless it is pinned or locked; True if it was removed."""
        d = self.dirs(name)
        try:
            with d.lock(version).acquire(timeout=0):
                if d.pinned(version):
                    return False
                trash = d.work_dir(version)
                os.replace(d.tree(version), trash / "tree")  # invisible first, then delete
                d.manifest_file(version).unlink(missing_ok=True)
                d.stamps_file(version).unlink(missing_ok=True)
                remove_tree(trash)
        except LockTimeout:
            return False
        with self._mlock:
            self._manifests.pop((name, version), None)
        return True

    def clean_leftovers(self) -> None:
        """Remove work folders of dead materializers and meta files without a tree."""
        for n in self.cached_names():
            d = self.dirs(n)
            found: dict[str, list[Path]] = {}
            for sub in ("tmp", "meta"):
                folder = d.root / sub
                for p in folder.iterdir() if folder.is_dir() else ():
                    found.setdefault(p.name.lstrip(".").split(".", 1)[0], []).append(p)
            for version, paths in found.items():
                try:
                    with d.lock(version).acquire(timeout=0):
                        for p in paths:
                            if p.parent.name == "tmp" or not d.tree(version).is_dir():
                                remove_tree(p) if p.is_dir() else p.unlink(missing_ok=True)
                except LockTimeout:
                    continue  # someone is working on that version right now


def _private_copy(src: Path, dest: Path) -> Path:
    final = prepare_dest(dest)
    work = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.copytree(src, work)
    os.replace(work, final)
    return final
