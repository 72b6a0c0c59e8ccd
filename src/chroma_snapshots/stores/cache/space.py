"""What the /tmp cache holds and how it makes room: its folders per name, the manifests of
complete versions, its size, least-recently-used eviction and the clean-up of what dead
processes left. :class:`~chroma_snapshots.stores.cache.store.CachedStore` builds on it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from filelock import Timeout as LockTimeout

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.folders import ASIDE, remove_tree, sweepable
from chroma_snapshots.engine.models import Manifest, VersionId
from chroma_snapshots.engine.placer import local_io
from chroma_snapshots.engine.validation import check_flags, check_name, is_name, number_in
from chroma_snapshots.errors import (
    CacheFullError,
    InvalidInputError,
    LocalDiskError,
    StorageTimeoutError,
    shown,
)
from chroma_snapshots.stores.cache.copies import sweep_copies
from chroma_snapshots.stores.cache.layout import TMP_STEM, NameDirs, real_dir
from chroma_snapshots.stores.cache.room import (
    copies_bytes,
    drop_build_folder,
    idle_builds,
    live_build_claims,
    room_lock,
)

USAGE_WAIT = 10.0  # seconds usage() waits for the room lock before counting without it
POLL = 0.005  # seconds between tries of the room lock: it is held for milliseconds


class NoRoom(CacheFullError):
    """The cache's budget (max_bytes, min_free_bytes) cannot take a version: a checkout
    with a dest then goes past the cache, straight to dest."""


class CacheSpace:
    """The cache's folders below ``root`` and the room in them (``max_bytes``, and
    ``min_free_bytes`` of the disk kept free)."""

    root: Path
    max_bytes: int | None
    min_free_bytes: int
    _manifests: dict[tuple[str, str], Manifest]
    _mlock: threading.Lock

    def dirs(self, name: str) -> NameDirs:
        """The cache folders of ``name``."""
        return NameDirs(self.root / check_name(name))

    def version_dirs(self, name: str, version: str) -> NameDirs:
        """The cache folders of ``name``, for a call naming one of its versions. The version
        becomes a file name below them, so anything but a version id ("../x", a NUL, a name
        too long for the disk, not a str) is InvalidInputError before the disk is touched."""
        d = self.dirs(name)
        VersionId.parse(version)
        return d

    def cached_names(self) -> list[str]:
        """Names with anything in the cache (real folders with a snapshot's name: not a
        link, nor the room lock, whatever stands at its name)."""
        with os.scandir(self.root) as entries:
            found = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        return sorted(n for n in found if is_name(n))

    def cached_manifest(self, name: str, version: str) -> Manifest | None:
        """The manifest of a complete cached version; None if it is not (or no longer)
        cached. Without the version's lock (or a pin) it may be evicted the moment after."""
        d = self.version_dirs(name, version)
        if not d.is_complete(version):
            return None
        with self._mlock:
            m = self._manifests.get((name, version))
        if m is None:
            m = d.read_manifest(version)
            if m is None:
                return None
            with self._mlock:
                self._manifests[(name, version)] = m
        return m

    def usage(self) -> int:
        """Bytes the cache holds, as file contents (sizes, not disk blocks): its complete
        versions (from their manifests), private copies and builds in progress (what each
        claimed: stores/cache/room.py). Counted under the room lock, waited for at most
        ``USAGE_WAIT`` seconds (past it, counted without: a count taken while another
        process makes room can then see both a version it evicts and the claim that took
        its place). LocalDiskError if the cache's folders cannot be read."""
        with local_io(self.root, "counting the cache"):
            try:
                with room_lock(self.root).acquire(timeout=USAGE_WAIT, poll_interval=POLL):
                    return self._usage()
            except LockTimeout:
                return self._usage()

    def _usage(self) -> int:
        total = 0
        for n in self.cached_names():
            d = self.dirs(n)
            building = live_build_claims(d)  # first (see there)
            for v in d.complete():
                building.pop(v, None)  # landed since: counted by its manifest
                if (m := self.cached_manifest(n, v)) is not None:
                    total += m.total_size
            total += sum(building.values()) + copies_bytes(d)
        return total

    @contextmanager
    def _room(self, dl: Deadline) -> Iterator[None]:
        """The cache's room lock: held while counting, making room and claiming it
        (stores/cache/room.py), so that processes making room at the same moment count each
        other's claims. StorageTimeoutError once ``dl`` has passed."""
        try:
            held = room_lock(self.root).acquire(
                timeout=max(dl.remaining(), 0.001), poll_interval=POLL
            )
        except LockTimeout as e:
            raise StorageTimeoutError(
                f"waited too long for the room lock of cache {self.root}: another process "
                "is making room in it"
            ) from e
        with held:
            yield

    def _make_room(
        self, need: int, keep: tuple[str, str], held: int = 0, building: Path | None = None
    ) -> None:
        """Evict until ``need`` more bytes fit, else NoRoom. ``held``: bytes already on disk
        that :meth:`usage` no longer counts (a retired version being patched into the new
        one): the cap counts them, the free space already has them. With the room lock held:
        what dead processes left is removed first, so that the disk holds what is counted
        (``building``: the work folder of ``keep`` whose version's lock this call holds;
        any other work folder of that version is a dead build's)."""
        for n in self.cached_names():
            mine = (keep[1], building) if building is not None and n == keep[0] else None
            self._sweep_dead(self.dirs(n), mine)
        usage = self._evict_until(need, keep, held)
        free = shutil.disk_usage(self.root).free
        if self._too_full(need, usage, free):
            # others evict too (not under the room lock: evict, prune): count afresh
            # before giving up
            usage = self._usage() + held
        if self._too_full(need, usage, free):
            raise NoRoom(
                f"cache {self.root} cannot hold {need} more bytes for a version of "
                f"{need + held} (using {usage}, {free} free, "
                f"max_bytes={self.max_bytes}, min_free_bytes={self.min_free_bytes}) even after "
                "evicting every unpinned version without a file system mounted in it"
            )

    def _evict_until(self, need: int, keep: tuple[str, str], held: int = 0) -> int:
        """Evict least recently used unpinned versions (not ``keep``) until ``need`` fits
        (``held``: as :meth:`_make_room`'s); return the usage it ended with."""
        entries = sorted(
            (self.dirs(n).last_used(v), n, v)
            for n in self.cached_names()
            for v in self.dirs(n).complete()
            if (n, v) != keep
        )
        usage = self._usage() + held
        free = shutil.disk_usage(self.root).free
        for _, n, v in entries:
            if not self._too_full(need, usage, free):
                break
            m = self.cached_manifest(n, v)
            with contextlib.suppress(LocalDiskError):  # a mount in it: the next one goes instead
                if m is not None and self.evict(n, v):
                    usage, free = usage - m.total_size, free + m.total_size
        return usage

    def _too_full(self, need: int, usage: int, free: int) -> bool:
        over_cap = self.max_bytes is not None and usage + need > self.max_bytes
        return over_cap or free - need < self.min_free_bytes

    def evict(self, name: str, version: str) -> bool:
        """Remove a cached version unless it is pinned or locked; True if this call removed
        it (a version another process evicted first is a no-op: False). LocalDiskError,
        and nothing removed, if a file system is mounted at it or inside it."""
        d = self.version_dirs(name, version)
        try:
            with d.lock(version).acquire(timeout=0):
                if d.pinned(version) or not d.is_complete(version):
                    return False
                d.discard(version)
        except LockTimeout:
            return False
        with self._mlock:
            self._manifests.pop((name, version), None)
        return True

    def clean_leftovers(self) -> None:
        """Remove work folders of dead materializers and meta files without a tree (not
        the folders set aside, engine/folders.set_aside)."""
        for n in self.cached_names():
            d = self.dirs(n)
            self._sweep_dead(d)
            self._drop_orphans(n)
            _drop_stale_temp(d)

    def _sweep_dead(self, d: NameDirs, mine: tuple[str, Path] | None = None) -> None:
        """Remove what dead processes' builds and copies left: work folders, meta files
        without a tree (of a version whose lock is free: no build of it is running; or
        whose lock this call holds, ``mine``: all but its own work folder) and private
        copies whose pin is free."""
        found: dict[str, list[Path]] = {}
        for sub in ("tmp", "meta"):
            for entry in d.names(sub):  # (never through a link: owned.py)
                if ASIDE in entry:
                    continue  # another process's folder, set aside: not ours to remove
                version = entry.lstrip(".").split(".", 1)[0]
                found.setdefault(version, []).append(d.root / sub / entry)
        for version, paths in found.items():
            if mine is not None and version == mine[0]:
                _sweep_version(d, version, [p for p in paths if p.name != mine[1].name])
                continue
            try:
                with d.lock(version).acquire(timeout=0):
                    _sweep_version(d, version, paths)
            except LockTimeout:
                continue  # someone is working on that version right now
        for version in idle_builds(d):
            with contextlib.suppress(LockTimeout), d.lock(version).acquire(timeout=0):
                drop_build_folder(d, version)  # (a claim made since keeps it)
        sweep_copies(d)

    def _drop_orphans(self, name: str) -> None:
        """Remove trees in ``versions/`` whose meta files are gone or unreadable: damage by
        hand (a build writes them before its tree lands; an eviction removes the tree
        first), which left a tree nothing counted, listed or evicted, holding its bytes for
        good. Not one someone holds (pinned) or works on (locked)."""
        d = self.dirs(name)
        for v in d.names("versions"):
            if not VersionId.is_version(v) or d.pinned(v) or self._readable(d, v):
                continue
            # busy (LockTimeout), or a mount in it (LocalDiskError): left as it is
            with contextlib.suppress(LockTimeout, LocalDiskError), d.lock(v).acquire(timeout=0):
                if real_dir(d.tree(v)) and not d.pinned(v) and not self._readable(d, v):
                    d.discard(v)

    @staticmethod
    def _readable(d: NameDirs, version: str) -> bool:
        return d.is_complete(version) and d.read_manifest(version) is not None


def _sweep_version(d: NameDirs, version: str, paths: list[Path]) -> None:
    """Remove the leftovers ``paths`` of ``version`` (with its lock held): work folders, and
    meta files if its tree is gone."""
    for p in paths:
        if p.parent.name == "tmp":
            _remove_left(p)
        elif not real_dir(d.tree(version)):  # meta without a tree
            remove_tree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _remove_left(path: Path) -> None:
    """A leftover in ``tmp/``, only if the cache made it (engine/folders.sweepable: a name
    it gives, and for one named for its folder, still that folder); a link an eviction
    moved there goes too (its target stays)."""
    if real_dir(path):
        if (made := sweepable(path, TMP_STEM)) is not None:
            remove_tree(path, only=made)
    elif re.fullmatch(TMP_STEM, path.name):
        path.unlink(missing_ok=True)


def _drop_stale_temp(d: NameDirs, age: float = 3600.0) -> None:
    """Remove temp files (``.<name>.<hex>.tmp``) a killed writer left in ``refs/``: a live
    writer renames its own within milliseconds."""
    for name in d.names("refs"):
        p = d.root / "refs" / name
        try:
            temp = name.startswith(".") and name.endswith(".tmp")
            if temp and p.stat().st_mtime < time.time() - age:
                p.unlink(missing_ok=True)
        except OSError:
            continue


def check_settings(
    max_bytes: object,
    min_free_bytes: object,
    refresh_seconds: object,
    stale_after: object,
    flags: Mapping[str, object],
) -> None:
    """InvalidInputError for settings that would quietly do something else: a NaN cap
    (none) or free-space margin (never too full), a negative interval, a stale_after of 0
    (every healthy read stale), a flag that is not a bool ("no" is true). A negative
    min_free_bytes is allowed: it leaves the judgement to the disk's own ENOSPC."""
    # whole bytes, as StoreConfig's cache_max_bytes: 1.5 bytes is a mistake, not a size
    if max_bytes is not None and not (type(max_bytes) is int and number_in(max_bytes, 0, 2**63)):
        raise InvalidInputError(f"max_bytes must be 0 to 2**63 bytes, not {shown(max_bytes)}")
    if not (type(min_free_bytes) is int and number_in(min_free_bytes, -(2**63), 2**63)):
        msg = f"min_free_bytes must be a whole number of bytes, not {shown(min_free_bytes)}"
        raise InvalidInputError(msg)
    if refresh_seconds is not None and not number_in(refresh_seconds, 0, float("inf")):
        msg = f"refresh_seconds must be >= 0 seconds, not {shown(refresh_seconds)}"
        raise InvalidInputError(msg)
    if not number_in(stale_after, 0, 1e9, low_ok=False):
        msg = f"stale_after must be positive and finite, not {shown(stale_after)}"
        raise InvalidInputError(msg)
    check_flags(flags)
