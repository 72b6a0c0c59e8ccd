"""On-disk layout of the /tmp cache and the small records kept beside each version.

::

    {cache_dir}/{store key}/.room.lock   one process at a time counts and claims room
    {cache_dir}/{store key}/{name}/
        versions/{version}/          a complete, verified tree (what consumers open)
        meta/{version}.manifest      the manifest's canonical bytes
        meta/{version}.stamps        size, mtime_ns, mode of every file as materialized
        tmp/{version}.{pid}.{uuid}/  work in progress; never served, cleaned at next open
        locks/{version}.lock         one materializer or repairer per version at a time
        pins/{version}/{pid}-{uuid}  a consumer holds this version open (its shared flock)
        building/{version}/{pid}-{uuid}  a build's claim on the room (bytes; room.py)
        copies/{version}.{pin}/      a private copy; its pin (copies/.pins) claims its room
        refs/{ref}                   the version the ref named when last read

A version is complete when its tree and both meta files exist. Meta files are
written before the tree is renamed into place and removed after it is gone,
so a crash at any point leaves either a complete version or only leftovers.
Other processes may evict any version at any time unless its lock is held or
a live pin names it, so every read here tolerates a version that just vanished.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from filelock import Timeout as LockTimeout

from chroma_snapshots.engine import manifest_v2
from chroma_snapshots.engine.beneath import Beneath, FileId
from chroma_snapshots.engine.folders import HOLD_FLAGS, carrying, folder_of, remove_tree
from chroma_snapshots.engine.localcopy import Stamp, stamp_of_stat
from chroma_snapshots.engine.localfs import foreign_dir, foreign_link
from chroma_snapshots.engine.models import Manifest, VersionId
from chroma_snapshots.engine.placer import local_io
from chroma_snapshots.engine.treewalk import mounts_within, own_at, rename_new
from chroma_snapshots.engine.validation import MAX_MANIFEST_BYTES, as_obj, check_name, loads_json
from chroma_snapshots.errors import ConfigError, LocalDiskError, SnapshotError
from chroma_snapshots.stores.cache.owned import listed, own_folder, own_lock_file
from chroma_snapshots.stores.cache.pins import Pin, live_pins, make_pin

# A stamp (engine/localcopy.Stamp) is size, mtime_ns, permission bits, ctime_ns and inode:
# a consumer can put an mtime back (os.utime), never a ctime, so a file written and
# re-dated still looks changed; and a file moved to another path (a folder renamed moves
# its files without a new ctime) is another inode there.
_SPLIT = (
    "a file system is mounted at the cache's tmp/ or versions/ folder: nothing can be "
    "evicted or replaced until it is unmounted"
)
# the names given in tmp/ (``_tmp_path``: <version>.<pid>.<random>), as a pattern for
# engine/folders.sweepable: a clean-up there takes nothing else
TMP_STEM = r"[^./]+\.\d+\.[0-9a-f]{8}"
_NOT_OURS = (
    "not a file the cache wrote (replaced, or linked elsewhere, after it was written); "
    "nothing recorded"
)
_MOUNTED = (
    "a file system is mounted at this cached version or inside it: nothing is evicted (unmount it)"
)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a unique temp file and rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)  # a buffered write: loops on short writes or raises
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def stamp_of(path: Path) -> Stamp | None:
    """The stamp of a regular file, or None if it is missing or not a regular file."""
    try:
        return stamp_of_stat(os.lstat(path))  # lstat: a symlink is not a regular file here
    except OSError:
        return None


def stamp_at(t: Beneath, rel: str) -> Stamp | None:
    """:func:`stamp_of` the file ``rel`` of ``t``, reached without following a link: a
    folder swapped for a link to other files gives None (changed), never their stamps."""
    st = t.lstat(rel)
    return None if st is None else stamp_of_stat(st)


def _stamp(t: Beneath, rel: str, made: Mapping[str, FileId] | None) -> Stamp | None:
    """The stamp to record for ``rel`` (see NameDirs.write_stamps), from the very stat
    its identity was checked on (a second look could see a file swapped in between)."""
    known = made.get(rel) if made else None
    st = t.lstat(rel) if known is None else t.check_made(rel, known)
    stamp = None if st is None else stamp_of_stat(st)
    if st is None or stamp is None or st.st_nlink != 1:
        raise LocalDiskError(errno.ESTALE, _NOT_OURS, str(t.path / rel))
    return stamp


def real_dir(path: Path) -> bool:
    """A folder itself, not a link to one (a consumer may swap one in)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class NameDirs:
    """The cache folders of one snapshot name."""

    root: Path

    def tree(self, version: str) -> Path:
        return self.root / "versions" / version

    def manifest_file(self, version: str) -> Path:
        return self.root / "meta" / f"{version}.manifest"

    def stamps_file(self, version: str) -> Path:
        return self.root / "meta" / f"{version}.stamps"

    def folder(self, *parts: str) -> Path:
        """The cache's own folder ``parts`` of this name, made if missing, never through
        a link (stores/cache/owned.py)."""
        return own_folder(self.root.joinpath(*parts), self.root.parent)

    def names(self, *parts: str) -> list[str]:
        """The names in the cache's own folder ``parts`` of this name, never through a
        link ([] if it is not a folder: owned.py)."""
        return listed(self.root.joinpath(*parts), self.root.parent)

    def lock(self, version: str) -> FileLock:
        return FileLock(own_lock_file(self.folder("locks") / f"{version}.lock"))

    def work_path(self, version: str) -> Path:
        """A fresh name in ``tmp/`` for a work folder: the stem of the name it gets once
        made (engine/folders.new_folder) or a retired version is renamed there (onto
        nothing, never over a folder), each named for its inode."""
        return self._tmp_path(version)

    def _tmp_path(self, version: str) -> Path:
        """``tmp/<version>.<pid>.<random>`` (TMP_STEM), the stem of a name in ``tmp/``."""
        return self.folder("tmp") / f"{version}.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    def complete(self) -> list[str]:
        """Complete versions, oldest id first (any may be evicted the moment after)."""
        return sorted(v for v in self.names("versions") if self.is_complete(v))

    def drop_damaged(self) -> None:
        """Discard entries of ``versions/`` that are not real folders (a consumer swapped a
        checkout for a link or a file): never complete, so nothing else would remove them."""
        for v in self.names("versions"):
            if not real_dir(self.tree(v)):
                try:
                    with self.lock(v).acquire(timeout=0):
                        if not real_dir(self.tree(v)):
                            self.discard(v)
                except LockTimeout:
                    continue  # its checkout is replacing it right now
                except LocalDiskError:
                    continue  # a file bind-mounted there: not ours to remove

    def is_complete(self, version: str) -> bool:
        """Its tree and both meta files are there. A tree that is not a real folder (a
        consumer's symlink) is damage: never served, patched or followed (``discard``)."""
        return (
            real_dir(self.tree(version))
            and self.manifest_file(version).is_file()
            and self.stamps_file(version).is_file()
        )

    def read_manifest(self, version: str) -> Manifest | None:
        """The cached manifest; None if it is gone (evicted) or damaged, which includes a
        manifest whose bytes are not the version's (moved from another version's place)."""
        try:
            data = self.manifest_file(version).read_bytes()
            m = manifest_v2.loads(data)
            return m if VersionId.parse(version).names(data, m.created_at) else None
        except (OSError, ValueError, SnapshotError):
            return None

    def read_stamps(self, version: str) -> dict[str, Stamp]:
        """The stamps; empty if gone or damaged, which makes every file look changed.
        Parsed like stored JSON (size and nesting bounded, IntegrityError), so a planted
        deeply nested file is damage, not a RecursionError."""
        path = self.stamps_file(version)
        try:
            what = f"cache stamps {path}"
            raw = as_obj(loads_json(path.read_bytes(), what, MAX_MANIFEST_BYTES), what, None)
            # stamps of an older release (3 or 4 fields: no inode) fail here: every file is
            # then rehashed once
            return {
                k: (int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4])) for k, v in raw.items()
            }
        except (OSError, SnapshotError, ValueError, TypeError, IndexError, AttributeError):
            return {}

    def write_stamps(
        self,
        version: str,
        root: Path,
        manifest: Manifest,
        made: Mapping[str, FileId] | None = None,
    ) -> None:
        """Record the stamps of the files just written or repaired: only of regular files
        with no other link, each still the file the build left (``made``: device, inode,
        birth time); else LocalDiskError, nothing recorded: a file another process put in
        place after the writes would be trusted for good."""
        with Beneath(root) as t:  # recorded as served: a link swapped in is no file's stamp
            stamps = {f.path: _stamp(t, f.path, made) for f in manifest.files}
        write_atomic(self.stamps_file(version), json.dumps(stamps).encode())

    def write_meta(
        self,
        version: str,
        root: Path,
        manifest: Manifest,
        made: Mapping[str, FileId] | None = None,
    ) -> None:
        self.folder("meta")
        self.drop_meta(version)  # a folder put at either name would fail the rename over it
        write_atomic(self.manifest_file(version), manifest_v2.dumps(manifest))
        self.write_stamps(version, root, manifest, made)

    def last_used(self, version: str) -> float:
        try:
            return self.stamps_file(version).stat().st_atime
        except OSError:
            return 0.0

    def touch(self, version: str) -> None:
        """Record a use (LRU order is by the stamps file's atime, set explicitly).

        Only with the version's lock held on a complete version: nobody can evict it then."""
        path = self.stamps_file(version)
        st = path.stat()
        os.utime(path, ns=(max(st.st_atime_ns, time.time_ns()), st.st_mtime_ns))

    def pin(self, version: str) -> Pin:
        """Hold ``version``: a pin file this process keeps a shared lock on until
        ``unlink``. The lock, not a pid, says the holder lives: the kernel drops it when
        the process dies, whatever PID namespace it ran in (a container sharing the cache
        folder sees other pids, or none)."""
        return make_pin(self.root / "pins" / version, self.root.parent)

    def copies(self) -> Path:
        """Private copies of versions another checkout holds: each folder is named after
        the pin (in ``.pins``) that keeps it while its holder lives."""
        return self.root / "copies"

    def pinned(self, version: str) -> bool:
        """True if a live process holds a pin on ``version`` (dead holders' pins are removed)."""
        return bool(live_pins(self.root / "pins" / version, self.root.parent))

    def discard(self, version: str) -> None:
        """Remove a version, tree first (so it stops being complete at once), then its meta.
        With the version's lock held; a version another process already removed is a no-op.
        LocalDiskError, and nothing removed, if a file system is mounted at it or inside
        it: the files on a mount are not the cache's, and its space would not be freed."""
        tree = self.tree(version)
        if mounts_within(tree):
            raise LocalDiskError(errno.EBUSY, _MOUNTED, str(tree))
        # a rename needs no free space (eviction frees it); what moved is removed only if it
        # is the version's folder as found, held open meanwhile so that its inode number is
        # not another folder's (a link moves as itself: its target stays)
        try:
            fd = os.open(tree, HOLD_FLAGS)
        except OSError:
            fd = -1  # gone (evicted by another process), or a link
        try:
            found = None if fd < 0 else folder_of(fd)
            stem = self._tmp_path(version)
            trash = stem if fd < 0 else carrying(stem, fd)
            self._move_to_trash(tree, trash)
            try:  # (not when the tree stayed: the version is still complete, and served)
                self.drop_meta(version)
            finally:
                remove_tree(trash, only=found)  # (a link: only=None removes the link itself)
        finally:
            if fd >= 0:
                os.close(fd)

    def _move_to_trash(self, tree: Path, trash: Path) -> None:
        try:
            own_at(tree)  # moving a folder needs write permission on it
            rename_new(tree, trash)
        except FileNotFoundError:
            pass  # evicted by another process before we got the lock
        except OSError as e:
            if e.errno == errno.EXDEV:  # tmp/ (or versions/) is a mount of its own
                raise LocalDiskError(e.errno, _SPLIT, str(self.root / "tmp")) from e
            if e.errno == errno.EEXIST:  # another process's folder took the new name
                raise LocalDiskError(
                    e.errno, "the name it was to move to is taken", str(trash)
                ) from e
            if e.errno != errno.EBUSY:  # mounted at since the check
                raise
            raise LocalDiskError(e.errno, _MOUNTED, str(tree)) from e

    def drop_meta(self, version: str) -> None:
        """Remove a version's meta files (it is then not complete, whatever its tree), and
        whatever else is at their names; and its pins folder if no pin is left in it (with
        the version's lock held, as every pin is made: no pin can be on its way in)."""
        remove_tree(self.manifest_file(version))
        remove_tree(self.stamps_file(version))
        with contextlib.suppress(OSError):  # a live pin (not empty), or never pinned
            os.rmdir(self.root / "pins" / version)

    def recorded_ref(self, ref: str) -> str | None:
        """The version ``ref`` named when it was last read from the store, if recorded."""
        try:
            version = (self.root / "refs" / check_name(ref, "ref name")).read_text()
        except (OSError, UnicodeDecodeError):
            return None
        return version if VersionId.is_version(version) else None

    def forget_ref(self, ref: str) -> str:
        """Forget what ``ref`` named, before a move through this cache is sent: the record
        holds a token of this move instead (read as nothing recorded), returned for
        :meth:`restore_ref`."""
        token = f"moving {uuid.uuid4().hex}"
        self._locked_write(ref, token)
        return token

    def restore_ref(self, ref: str, token: str, version: str | None) -> None:
        """Put back what ``ref`` named before a move that made nothing visible, only if
        the record still holds that move's ``token``: a move through this cache by another
        process since then (a rollback) recorded, or forgot, what it knows, and that wins."""
        path = self.root / "refs" / check_name(ref, "ref name")
        with contextlib.suppress(OSError, UnicodeDecodeError), self._ref_lock(ref):
            if path.read_text() == token:  # else: left as it is (forgotten, or newer)
                self._write_ref(ref, version)

    def record_ref(self, ref: str, version: str | None) -> None:
        """Remember that ``ref`` names ``version`` (None: the ref does not exist); written
        only when it changed. A record that cannot be written is removed, so a stale read
        fails rather than serve a version the ref no longer names."""
        if self.recorded_ref(ref) != version:
            self._locked_write(ref, version)

    def _locked_write(self, ref: str, content: str | None) -> None:
        with local_io(self.root / "locks", "locking a cache record"), self._ref_lock(ref):
            self._write_ref(ref, content)

    def _ref_lock(self, ref: str) -> FileLock:
        """Held while a ref's record is written: a restore reads and writes it as one."""
        name = check_name(ref, "ref name")
        return FileLock(own_lock_file(self.folder("locks") / f"ref.{name}.lock"))

    def _write_ref(self, ref: str, content: str | None) -> None:
        path = self.root / "refs" / check_name(ref, "ref name")
        try:
            if content is None:
                path.unlink(missing_ok=True)
            else:
                self.folder("refs")
                write_atomic(path, content.encode())
        except OSError:
            with local_io(path, "removing a cache record it could not update"):
                path.unlink(missing_ok=True)  # if even this fails: LocalDiskError


def check_links(cache_dir: Path) -> None:
    """ConfigError if a symbolic link on the way to ``cache_dir`` is neither this user's
    nor root's, before anything is made there: another user's link in /tmp chose where
    the cache was written (a link of ours or root's is followed)."""
    why = foreign_link(cache_dir)
    if why is not None:
        raise ConfigError(f"cache directory {cache_dir} cannot be trusted: {why}")


def check_trusted(cache_dir: Path, root: Path) -> None:
    """ConfigError unless only this user controls ``root``, this store's folder in
    ``cache_dir``, and no one else can replace it there: a warm checkout serves what the
    cache holds on the strength of its stamps, so another user who could write there (a
    squatted /tmp folder) could have it serve their bytes. ``cache_dir`` may be shared
    if it is root's or ours and sticky (/tmp, a tmpfs mount): there only an entry's owner
    can rename it, and ``root`` must be ours. Call :func:`check_links` first."""
    why = foreign_dir(root, 0o022)
    if why is None:
        cache_dir = cache_dir.resolve()  # the folder a link names
        why = foreign_dir(cache_dir, 0o022, owners=(0,), sticky_ok=True)
        root = cache_dir
    if why is not None:
        raise ConfigError(
            f"cache directory {root} cannot be trusted: {why}. Use a directory this user "
            "owns that no one else can write (e.g. mode 0700)"
        )
