"""What ``chroma-snapshots cache ls | clear | verify`` report about a CachedStore."""

from __future__ import annotations

from dataclasses import dataclass

from ..chunking import read_chunks
from ..validation import sha256_hex
from .store import CachedStore


@dataclass(frozen=True)
class CacheEntry:
    """One complete cached version."""

    name: str
    version: str
    size: int
    last_used: float
    pinned: bool


def entries(store: CachedStore) -> list[CacheEntry]:
    """Every complete cached version, least recently used first."""
    out = []
    for name in store.cached_names():
        d = store.dirs(name)
        for v in d.complete():
            size = d.read_manifest(v).total_size
            out.append(CacheEntry(name, v, size, d.last_used(v), d.pinned(v)))
    return sorted(out, key=lambda e: e.last_used)


def clear(store: CachedStore) -> list[CacheEntry]:
    """Evict every unpinned version; returns what was removed."""
    return [e for e in entries(store) if store.evict(e.name, e.version)]


def verify(store: CachedStore, entry: CacheEntry) -> list[str]:
    """Rehash every file of a cached version against its manifest; the problems found."""
    d = store.dirs(entry.name)
    manifest = d.read_manifest(entry.version)
    tree = d.tree(entry.version)
    problems = []
    for f in manifest.files:
        path = tree / f.path
        if not path.is_file():
            problems.append(f"{f.path}: missing")
            continue
        got = [sha256_hex(c) for c in read_chunks(path, manifest.chunk_size)]
        if path.stat().st_size != f.size or tuple(got) != f.chunks:
            problems.append(f"{f.path}: content differs from the manifest")
    expected = {f.path for f in manifest.files}
    extra = [p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()]
    problems += [f"{p}: not in the manifest" for p in sorted(set(extra) - expected)]
    return problems
