"""Finding what a consumer did to a cached tree, so only that is undone."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from chroma_snapshots.engine.beneath import Beneath
from chroma_snapshots.engine.bundles import Reader, member_reader, members, rebuild
from chroma_snapshots.engine.chunkids import chunk_ok
from chroma_snapshots.engine.deadline import checked
from chroma_snapshots.engine.localcopy import Stamp
from chroma_snapshots.engine.models import FileEntry, Manifest, is_slice
from chroma_snapshots.stores.cache.layout import stamp_at

# Owner read and write: held while the cache checks and writes a file; the manifest's mode
# is set once its bytes are in place (a read-only mode before the writes would refuse them)
OWNER_RW = stat.S_IRUSR | stat.S_IWUSR


def manifest_folders(manifest: Manifest) -> set[str]:
    """Every folder a version has: its listed (empty) ones and each file's parents."""
    dirs = set(manifest.dirs)
    for p in [*(f.path for f in manifest.files), *manifest.dirs]:
        parts = p.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return dirs


def remove_extras(t: Beneath, manifest: Manifest, check: Callable[[], None] = lambda: None) -> None:
    """Delete files, links and directories the manifest does not have (WAL files, scratch).
    The cache owns the folders it keeps: one a consumer made read-only gets its owner's
    permissions back first, or nothing in it could be removed or repaired. A file system
    mounted at any folder is LocalDiskError (nothing on it is written or deleted).
    ``check()`` runs every few entries and may raise (a deadline: a consumer may have
    added 300,000 files; what was removed stays removed, and the next call goes on)."""
    files, dirs = {f.path for f in manifest.files}, manifest_folders(manifest)
    stack = [""]  # only the manifest's folders are entered: as deep as its paths, no more
    while stack:
        rel = stack.pop()
        check()
        prefix = f"{rel}/" if rel else ""
        for name, is_dir in checked(t.scan(rel), check):
            path = prefix + name
            if not is_dir:  # a file, or a link (to a folder too): never followed
                if path not in files:  # a folder put back there since the listing stays
                    t.unlink(path)
                continue
            t.folder(path, make=True)  # owned; a mount point raises
            if path in dirs:
                stack.append(path)
            else:
                t.remove(path, check)


def changed_files(
    t: Beneath,
    manifest: Manifest,
    stamps: Mapping[str, Stamp],
    check: Callable[[], None] = lambda: None,
) -> list[str]:
    """Paths of ``manifest``'s files in ``t`` whose stamps are not those recorded when
    the cache wrote them (or whose recorded size or mode is not the manifest's); a file
    behind a link is changed. ``check()`` runs every few files and may raise (a deadline:
    a warm checkout of 20,000 files spends ~0.1 s here)."""
    changed = []
    for f in checked(manifest.files, check):
        s = stamps.get(f.path)
        if s is None or stamp_at(t, f.path) != s or s[0] != f.size or s[2] != f.mode:
            changed.append(f.path)
    return changed


def find_damage(
    tree: Path, manifest: Manifest, stamps: Mapping[str, Stamp], check: Callable[[], None]
) -> tuple[int, dict[str, list[int]]]:
    """What consumers did to a cached tree: how many files and empty folders changed, and
    the chunk indexes that differ in each file (:func:`damaged`); files and folders the
    manifest does not have are removed on the way, and its empty folders put back.
    ``check()`` runs as it goes and may raise (a deadline)."""
    with Beneath(tree) as t:
        # extras first: a link it replaces by a folder leaves that folder's files missing,
        # and only a look at the stamps afterwards sees them
        remove_extras(t, manifest, check)
        made = restore_dirs(t, manifest, check)
        bad = changed_files(t, manifest, stamps, check)
        return len(bad) + made, damaged(t, manifest, bad, check) if bad else {}


def restore_dirs(t: Beneath, manifest: Manifest, check: Callable[[], None]) -> int:
    """Make the manifest's empty folders that are missing (a consumer removed one, or put
    a file or link there, which remove_extras took away): how many were."""
    made = 0
    for rel in checked(manifest.dirs, check):
        if t.lstat(rel) is None:
            t.folder(rel, make=True)  # and its missing parents
            made += 1
    return made


class Bundles:
    """Whether each bundle of a manifest still verifies in a tree, each put together and
    hashed once per pass: asked once per member, 20,000 bundled files cost 20,000 reads
    of every member of their bundle (seconds of a repair, past any deadline)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest, self.members = manifest, members(manifest)
        self._ok: dict[str, bool] = {}

    def ok(self, t: Beneath, f: FileEntry, fd: int) -> bool:
        """True if the bundle holding ``f`` (open at ``fd``) is whole and verifies in
        ``t``. Checked once: a member missing or changed fails it at once, and then all
        its members are rewritten, so a later change to a member (its truncation) changes
        nothing. ``f`` itself is read from ``fd``, the file that is kept, and the other
        members through ``t`` (never through a link, never a FIFO)."""
        h = f.chunks[0]
        if h not in self._ok:
            got = rebuild(_reader(t, f, fd), self.members.get(h, [f]), self.manifest.chunks[h].size)
            self._ok[h] = got is not None and chunk_ok(got, h)
        return self._ok[h]


def _reader(t: Beneath, own: FileEntry, fd: int) -> Reader:
    """``own`` from ``fd`` (the file kept), the other members through ``t``."""
    others = member_reader(lambda rel: t.open(rel, os.O_RDONLY))

    def read(f: FileEntry) -> bytes | None:
        return os.pread(fd, f.size + 1, 0) if f.path == own.path else others(f)

    return read


def damaged(
    t: Beneath, manifest: Manifest, paths: list[str], check: Callable[[], None]
) -> dict[str, list[int]]:
    """The chunk indexes that differ in each file of ``paths`` (:func:`damaged_chunks`),
    for the files with any; ``check()`` before each file may raise (a deadline)."""
    by_path, bundles, out = {f.path: f for f in manifest.files}, Bundles(manifest), {}
    for p in paths:
        check()
        if idx := damaged_chunks(t, manifest, by_path[p], bundles):
            out[p] = idx
    return out


def damaged_chunks(t: Beneath, manifest: Manifest, f: FileEntry, bundles: Bundles) -> list[int]:
    """Bring one file back to the manifest's size and return the indexes of the chunks
    whose bytes differ (a missing file is recreated empty: every chunk differs); its mode
    is the manifest's if none does, else the placer's last step (engine/placer.py).
    A bundled file is checked by putting its bundle together from the tree (every member
    read and compared, once a pass: :class:`Bundles`): if that fails, the file's slice is
    rewritten. Everything goes through ``t``: a link swapped in at any moment is an error
    or is replaced, never written through."""
    st = t.lstat(f.path)
    if st is not None and not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
        t.remove(f.path)  # a link (soft or hard) may lead out of the cache: replaced
    _writable(t, f.path, f.mode)
    fd = t.open(f.path, os.O_RDWR | os.O_CREAT, parents=True)
    try:
        os.ftruncate(fd, f.size)
        os.fchmod(fd, f.mode | OWNER_RW)  # a file just created has the umask's mode
        if is_slice(f, manifest.chunks):
            bad = [] if bundles.ok(t, f, fd) else [0]  # f's own bytes included
        else:
            bad = _differing(fd, manifest, f)
        if not bad:  # else the placer sets it after writing (engine/placer.py)
            os.fchmod(fd, f.mode)
    finally:
        os.close(fd)
    return bad


def _differing(fd: int, manifest: Manifest, f: FileEntry) -> list[int]:
    cs, chunks = manifest.chunk_size, manifest.chunks
    return [
        i for i, h in enumerate(f.chunks) if not chunk_ok(os.pread(fd, chunks[h].size, i * cs), h)
    ]


def _writable(t: Beneath, rel: str, mode: int) -> None:
    """Let the owner read and write a file of the cache (a consumer's chmod 0400, or a
    file published read-only) before it is checked and written; a file the process may
    not chmod (not its own) is replaced instead."""
    try:
        t.chmod(rel, mode | OWNER_RW)
    except FileNotFoundError:
        pass  # created next
    except PermissionError:
        t.remove(rel)
