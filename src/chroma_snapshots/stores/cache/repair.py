"""Finding what a consumer did to a cached tree, so only that is undone."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from chroma_snapshots.engine.bundles import members, rebuild
from chroma_snapshots.engine.deadline import checked
from chroma_snapshots.engine.localfs import own_dir, remove_tree
from chroma_snapshots.engine.models import FileEntry, Manifest, is_slice
from chroma_snapshots.engine.treewalk import walk
from chroma_snapshots.engine.validation import chunk_ok
from chroma_snapshots.errors import LocalDiskError
from chroma_snapshots.stores.cache.layout import Stamp, stamp_of

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


def refuse_mount(folder: str, dev: int) -> None:
    """LocalDiskError if a file system is mounted at ``folder``, inside a cached tree on
    the device ``dev``: the cache neither deletes from it nor writes into it, and cannot
    serve the version."""
    try:
        mounted = os.lstat(folder).st_dev != dev
    except OSError:  # gone meanwhile: nothing mounted there
        mounted = False
    if mounted:  # (LocalDiskError is an OSError: raised outside the try)
        raise LocalDiskError(
            errno.EXDEV,
            "a file system is mounted inside a cached version; the cache will not write "
            "into it or delete from it (unmount it, then check out again)",
            folder,
        )


def remove_extras(tree: Path, manifest: Manifest, check: Callable[[], None] = lambda: None) -> None:
    """Delete files, links and directories the manifest does not have (WAL files, scratch).
    The cache owns the folders it keeps: one a consumer made read-only gets its owner's
    permissions back first, or nothing in it could be removed or repaired. ``check()``
    runs every few entries and may raise (a deadline: a consumer may have added 300,000
    files; what was removed stays removed, and the next call goes on from there)."""
    files, dirs = {f.path for f in manifest.files}, manifest_folders(manifest)
    own_dir(tree)
    dev = os.lstat(tree).st_dev
    for dirpath, dirnames, filenames in walk(tree):  # top-down: a folder is owned first
        check()
        rel = Path(dirpath).relative_to(tree).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        for fn in checked(filenames, check):
            if prefix + fn not in files:  # its writer may have removed it meanwhile
                Path(dirpath, fn).unlink(missing_ok=True)
        kept = []
        for dn in dirnames:
            full = os.path.join(dirpath, dn)
            refuse_mount(full, dev)
            if os.path.islink(full):
                Path(full).unlink(missing_ok=True)
            elif prefix + dn not in dirs:
                remove_tree(Path(full), check)
            else:
                own_dir(full)
                kept.append(dn)
        dirnames[:] = kept


def changed_files(
    tree: Path,
    manifest: Manifest,
    stamps: Mapping[str, Stamp],
    check: Callable[[], None] = lambda: None,
) -> list[str]:
    """Paths of ``manifest``'s files under ``tree`` whose stamps are not those recorded
    when the cache wrote them (or whose recorded size or mode is not the manifest's).
    ``check()`` runs every few files and may raise (a deadline: a warm checkout of 20,000
    files spends ~0.1 s here)."""
    changed = []
    for f in checked(manifest.files, check):
        s = stamps.get(f.path)
        if s is None or stamp_of(tree / f.path) != s or s[0] != f.size or s[2] != f.mode:
            changed.append(f.path)
    return changed


def find_damage(
    tree: Path, manifest: Manifest, stamps: Mapping[str, Stamp], check: Callable[[], None]
) -> tuple[int, dict[str, list[int]]]:
    """What consumers did to a cached tree: how many files changed, and the chunk indexes
    that differ in each (:func:`damaged`); files and folders the manifest does not have
    are removed on the way. ``check()`` runs as it goes and may raise (a deadline)."""
    bad = changed_files(tree, manifest, stamps, check)
    remove_extras(tree, manifest, check)
    return len(bad), damaged(tree, manifest, bad, check) if bad else {}


class Bundles:
    """Whether each bundle of a manifest still verifies in a tree, each put together and
    hashed once per pass: asked once per member, 20,000 bundled files cost 20,000 reads
    of every member of their bundle (seconds of a repair, past any deadline)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest, self.members = manifest, members(manifest)
        self._ok: dict[str, bool] = {}

    def ok(self, tree: Path, f: FileEntry) -> bool:
        """True if the bundle holding ``f`` is whole and verifies in ``tree``. Checked once:
        a member missing or changed fails it at once, and then all its members are
        rewritten, so a later change to a member (its truncation) changes nothing."""
        h = f.chunks[0]
        if h not in self._ok:
            got = rebuild(tree, self.members.get(h, [f]), self.manifest.chunks[h].size)
            self._ok[h] = got is not None and chunk_ok(got, h)
        return self._ok[h]


def damaged(
    tree: Path, manifest: Manifest, paths: list[str], check: Callable[[], None]
) -> dict[str, list[int]]:
    """The chunk indexes that differ in each file of ``paths`` (:func:`damaged_chunks`),
    for the files with any; ``check()`` before each file may raise (a deadline)."""
    by_path, bundles, out = {f.path: f for f in manifest.files}, Bundles(manifest), {}
    for p in paths:
        check()
        if idx := damaged_chunks(tree, manifest, by_path[p], bundles):
            out[p] = idx
    return out


def damaged_chunks(tree: Path, manifest: Manifest, f: FileEntry, bundles: Bundles) -> list[int]:
    """Bring one file back to the manifest's size and return the indexes of the chunks
    whose bytes differ (a missing file is recreated empty: every chunk differs); its mode
    is the manifest's if none does, else the placer's last step (engine/placer.py).
    A bundled file is checked by putting its bundle together from the tree (every member
    read and compared, once a pass: :class:`Bundles`): if that fails, the file's slice is
    rewritten."""
    path = tree / f.path
    linked = path.is_file() and not path.is_symlink() and os.lstat(path).st_nlink > 1
    if path.is_symlink() or linked or (path.exists() and not path.is_file()):
        # a link (soft or hard) may lead out of the cache: replaced, never written through
        remove_tree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    _writable(path, f.mode)
    with open(path, "ab") as fh:
        fh.truncate(f.size)
    os.chmod(path, f.mode | OWNER_RW)  # a file just created has the umask's mode
    bad = _differing(tree, manifest, f, bundles)
    if not bad:  # else the placer sets it after writing (engine/placer.py, finish)
        os.chmod(path, f.mode)
    return bad


def _differing(tree: Path, manifest: Manifest, f: FileEntry, bundles: Bundles) -> list[int]:
    if is_slice(f, manifest.chunks):
        return [] if bundles.ok(tree, f) else [0]  # f's own bytes included
    bad = []
    with open(tree / f.path, "rb") as fh:
        for i, h in enumerate(f.chunks):
            size = manifest.chunks[h].size
            if not chunk_ok(os.pread(fh.fileno(), size, i * manifest.chunk_size), h):
                bad.append(i)
    return bad


def _writable(path: Path, mode: int) -> None:
    """Let the owner read and write a file of the cache (a consumer's chmod 0400, or a
    file published read-only) before it is checked and written; a file the process may
    not chmod (not its own) is replaced instead."""
    try:
        os.chmod(path, mode | OWNER_RW)
    except FileNotFoundError:
        pass  # created next
    except PermissionError:
        path.unlink()
