"""What ``chroma-snapshots cache ls | clear | verify`` report about a CachedStore."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chroma_snapshots.engine.bundles import members, reader_under, rebuild
from chroma_snapshots.engine.chunkids import chunk_ok
from chroma_snapshots.engine.chunking import read_chunks
from chroma_snapshots.engine.models import FileEntry, Manifest, is_slice
from chroma_snapshots.engine.treewalk import walk
from chroma_snapshots.errors import InvalidInputError, LocalDiskError
from chroma_snapshots.stores.cache.layout import real_dir
from chroma_snapshots.stores.cache.repair import manifest_folders
from chroma_snapshots.stores.cache.store import CachedStore

_WAIT_FOR_LOCK = 30.0  # a version being repaired or materialized is worth waiting for


@dataclass(frozen=True)
class CacheEntry:
    """One complete cached version."""

    name: str
    version: str
    size: int
    last_used: float
    pinned: bool


def entries(store: CachedStore) -> list[CacheEntry]:
    """Every complete cached version, least recently used first (other processes may
    evict any of them meanwhile: those are left out)."""
    out = []
    for name in store.cached_names():
        d = store.dirs(name)
        for v in d.complete():
            if (m := store.cached_manifest(name, v)) is not None:
                out.append(CacheEntry(name, v, m.total_size, d.last_used(v), d.pinned(v)))
    return sorted(out, key=lambda e: e.last_used)


IN_USE = "in use by a process"  # why a version stays that will go once released


def evict(store: CachedStore, chosen: list[CacheEntry]) -> tuple[list[CacheEntry], dict[str, str]]:
    """Evict ``chosen``: what went, and why each of the others stayed (by "name/version"):
    a process holds it, or a file system is mounted in it (then the rest still go)."""
    removed, kept = [], {}
    for e in chosen:
        try:
            if store.evict(e.name, e.version):
                removed.append(e)
            else:
                kept[f"{e.name}/{e.version}"] = IN_USE
        except LocalDiskError as err:
            kept[f"{e.name}/{e.version}"] = err.strerror or str(err)
    return removed, kept


def verify(store: CachedStore, entry: CacheEntry) -> list[str]:
    """Rehash every file of a cached version against its manifest; the problems found
    (none if another process evicted it first: a version no longer cached is not wrong)."""
    held = store.hold(entry.name, entry.version, timeout=_WAIT_FOR_LOCK)
    if held is None:
        return []
    manifest, pin = held
    try:
        # its real path: a folder in it a consumer swapped for a link is then seen as one
        tree = Path(os.path.realpath(store.dirs(entry.name).tree(entry.version)))
        return _problems(tree, manifest)
    finally:
        pin.unlink(missing_ok=True)


def _problems(tree: Path, manifest: Manifest) -> list[str]:
    problems, bundles, verified = [], members(manifest), dict[str, bool]()
    for f in manifest.files:
        try:
            found = _problem(tree, manifest, f, bundles, verified)
        except OSError as e:  # a folder or file a consumer made unreadable (chmod 000)
            found = f"cannot be read ({e.strerror or e})"
        if found:
            problems.append(f"{f.path}: {found}")
    gone = [d for d in manifest.dirs if not real_dir(tree / d)]  # an empty folder removed
    problems += [f"{d}/: an empty folder of the version, missing" for d in gone]
    return problems + [f"{p}: not in the manifest" for p in _extras(tree, manifest)]


def _problem(
    tree: Path,
    manifest: Manifest,
    f: FileEntry,
    bundles: dict[str, list[FileEntry]],
    verified: dict[str, bool],
) -> str | None:
    """What is wrong with one file of a cached version; None if nothing."""
    path = tree / f.path
    if path.is_symlink():  # a consumer's link: not what the cache wrote, never read
        return "a symlink, not the file the cache wrote"
    if not path.is_file():  # a FIFO is never opened: it would block
        return "not a regular file" if os.path.lexists(path) else "missing"
    if is_slice(f, manifest.chunks):
        # one file of a bundle cannot be hashed alone: the bundle is put together
        h = f.chunks[0]
        if h not in verified:
            whole = rebuild(reader_under(tree), bundles[h], manifest.chunks[h].size)
            verified[h] = whole is not None and chunk_ok(whole, h)  # every member read
        return None if verified[h] else "content differs from the manifest (it or a file " \
            "bundled with it)"  # fmt: skip
    try:
        got = list(read_chunks(path, manifest.chunk_size))
    except InvalidInputError as e:
        if isinstance(e.__cause__, PermissionError):  # a consumer's chmod 000
            return f"cannot be read ({e.__cause__.strerror})"
        return "not the file the cache wrote (a link on its path)"
    ok = len(got) == len(f.chunks) and all(map(chunk_ok, got, f.chunks))
    return None if path.stat().st_size == f.size and ok else "content differs from the manifest"


def _extras(tree: Path, manifest: Manifest) -> list[str]:
    """Files, and folders (not entered: a consumer's may be thousands deep), that are
    not the version's."""
    files, folders, extra = {f.path for f in manifest.files}, manifest_folders(manifest), []
    for dirpath, dirnames, filenames in walk(tree):
        rel = Path(dirpath).relative_to(tree).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        extra += [prefix + fn for fn in filenames if prefix + fn not in files]
        extra += [
            prefix + dn + ("" if os.path.islink(os.path.join(dirpath, dn)) else "/")
            for dn in dirnames
            if prefix + dn not in folders
        ]
        dirnames[:] = [dn for dn in dirnames if prefix + dn in folders]
    return sorted(extra)
