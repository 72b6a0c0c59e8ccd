"""Building a new cached version by patching a retired older one in place.

On ext4 (Lambda's /tmp, this machine) ``copy_file_range`` is a page-cache copy, not a
shared extent: copying every unchanged byte of a 3 GiB version into a fresh tree cost
2.8 GiB read and 3 GiB written for a 1% change (benchmarks/incremental.py). Instead the
newest cached version that nobody holds is taken out of the cache (renamed into the new
version's work folder, as eviction would rename it away) and only the chunk positions
whose hash differs are written; the work folder is published as before, by rename.

Threat model, as for a warm checkout (docs/SECURITY.md): a file whose stamp (size, mtime,
mode, ctime) is as recorded right after it was written and verified still holds those
bytes, so its positions that the new manifest has unchanged are kept unread. Any other
file of the retired tree is checked chunk by chunk (read and hashed) and only what
verifies is kept; extra files, links and directories are removed. The retired version is
taken only under its lock, only if no ref this cache read last named it (that ref's next
checkout stays warm), not with ``stale_ok`` (which may serve any such version), and only
if no live process pins it: a checkout serves a
version pinned until ``release()``, and a process that keeps reading a folder after
releasing it may see it change (eviction would have deleted it instead).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import Timeout as LockTimeout

from chroma_snapshots.engine.beneath import Beneath, FileId
from chroma_snapshots.engine.chunkids import short_id
from chroma_snapshots.engine.folders import HOLD_FLAGS, Made, carrying
from chroma_snapshots.engine.localcopy import Stamp
from chroma_snapshots.engine.models import FileEntry, Manifest
from chroma_snapshots.engine.progress import StatsRecorder
from chroma_snapshots.engine.treewalk import mounts_within, own_at, rename_new
from chroma_snapshots.engine.validation import is_name
from chroma_snapshots.stores.cache.layout import NameDirs, stamp_at
from chroma_snapshots.stores.cache.repair import OWNER_RW, Bundles, damaged_chunks, remove_extras

_TRY = 3  # newest other versions tried: a busy one is skipped, never waited for


@dataclass(frozen=True)
class Retired:
    """A version taken out of the cache, its tree now at ``work``."""

    version: str
    manifest: Manifest
    stamps: dict[str, Stamp]
    made: Made  # where it is now (``tmp/``, named for itself), held open while patched


def take_retired(d: NameDirs, exclude: str, stem: Path) -> Retired | None:
    """Move the newest complete, unpinned, unlocked version other than ``exclude`` to
    ``stem`` named for its inode (engine/folders.carrying; onto nothing, so no folder there
    is replaced) and drop its meta; None if there is none. A version some ref was last
    seen to name stays: a checkout of that ref would find it warm."""
    d.drop_damaged()  # a tree swapped for a link: never taken, and removed here
    # a ref's records, not one being written (``.<ref>.<hex>.tmp``) or a stray name
    named = {d.recorded_ref(n) for n in d.names("refs") if is_name(n)}
    for v in [v for v in d.complete() if v != exclude and v not in named][-_TRY:][::-1]:
        try:
            with d.lock(v).acquire(timeout=0):
                if d.pinned(v) or not d.is_complete(v) or mounts_within(d.tree(v)):
                    continue  # (a mount in it, even over a file: not ours to patch)
                manifest = d.read_manifest(v)
                if manifest is None:
                    continue
                stamps = d.read_stamps(v)  # read before the tree moves: it is the proof
                own_at(d.tree(v))  # moving a folder needs write permission on it
                try:
                    fd = os.open(d.tree(v), HOLD_FLAGS)  # held: its inode stays its own
                except OSError:
                    continue  # not a folder (a link): not taken
                work = carrying(stem, fd)
                try:
                    rename_new(d.tree(v), work)  # no longer complete: nobody serves it now
                except OSError as e:
                    os.close(fd)
                    if e.errno in (errno.EBUSY, errno.EEXIST):  # mounted at; or the name taken
                        continue
                    raise
                d.drop_meta(v)
                return Retired(v, manifest, stamps, Made(work, fd))
        except LockTimeout:
            continue
    return None


def plan_patch(
    work: Path,
    old: Retired,
    new: Manifest,
    stats: StatsRecorder,
    check: Callable[[], None],
    made: dict[str, FileId],
) -> dict[str, list[int]]:
    """Bring ``work`` (the retired tree) to ``new``'s files, sizes and modes; return the
    chunk positions of each file still to be written (the bytes kept count as reused), and
    record in ``made`` the identity of each file as it was left (checked again before the
    stamps are recorded). ``check()`` runs before each file and may raise (a deadline).
    Everything in ``work`` is reached through folder descriptors (engine/beneath.py):
    never through a link."""
    with Beneath(work, old.made.id) as t:
        remove_extras(t, new)  # links and stray folders go before anything is looked at
        old_files = {f.path: f for f in old.manifest.files}
        # chunk i of another chunk size is at another offset: then nothing is kept unread
        same_size = old.manifest.chunk_size == new.chunk_size
        intact = {p for p, f in old_files.items() if same_size and _intact(t, f, old.stamps)}
        slices = Bundles(new)
        for d in new.dirs:
            t.folder(d, make=True)
        todo: dict[str, list[int]] = {}
        kept = 0
        for f in new.files:
            check()
            before = old_files.get(f.path)
            if before is not None and f.path in intact:
                positions = _patch_intact(t, before, f)
            elif before is not None and _own_file(t, f.path):
                positions = damaged_chunks(t, new, f, slices)  # a consumer's change: verify
            else:
                t.remove(f.path)
                positions = _create(t, f)
            kept += f.size - sum(new.chunks[f.chunks[i]].size for i in positions)
            made[f.path] = t.identity(f.path)[0]
            if positions:
                todo[f.path] = positions
    stats.add(bytes_reused=kept)
    return todo


def _intact(t: Beneath, f: FileEntry, stamps: dict[str, Stamp]) -> bool:
    # renaming the tree changes no file's stamp: a file's ctime is its inode's
    stamp = stamps.get(f.path)
    return stamp is not None and stamp[0] == f.size and stamp_at(t, f.path) == stamp


def _own_file(t: Beneath, rel: str) -> bool:
    """A regular file only this tree links to: a hard link to a file elsewhere (put there
    by a consumer) is replaced, never truncated or written through; a link or folder
    left at the path is removed."""
    st = t.lstat(rel)
    if st is None:
        return False
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return True
    t.remove(rel)
    return False


def _patch_intact(t: Beneath, before: FileEntry, f: FileEntry) -> list[int]:
    if before.at != f.at or (len(f.chunks) == 1 and before.size != f.size):
        # a bundled file: the same bundle holds other bytes at another start or length
        todo = list(range(len(f.chunks)))
    else:
        old = before.chunks  # ids of both lengths meet under the short one
        todo = [
            i for i, h in enumerate(f.chunks) if i >= len(old) or short_id(old[i]) != short_id(h)
        ]
    t.chmod(f.path, f.mode | OWNER_RW)  # a read-only file is cut and written too
    return _final(t, f, todo, os.O_WRONLY)


def _create(t: Beneath, f: FileEntry) -> list[int]:
    # O_EXCL: never through a link a consumer left
    return _final(t, f, list(range(len(f.chunks))), os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def _final(t: Beneath, f: FileEntry, positions: list[int], flags: int) -> list[int]:
    """Open the file with ``flags``, give it ``f``'s size, and its manifest mode now if
    nothing is left to write into it, else owner write permission until the placer has
    written it and sets the mode (placer.finish)."""
    fd = t.open(f.path, flags, parents=True)
    try:
        if os.fstat(fd).st_size != f.size:
            os.ftruncate(fd, f.size)
        os.fchmod(fd, f.mode | OWNER_RW if positions else f.mode)
    finally:
        os.close(fd)
    return positions
