"""Finding what a consumer did to a cached tree, so only that is undone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from chroma_snapshots.engine.bundles import rebuild
from chroma_snapshots.engine.localfs import remove_tree
from chroma_snapshots.engine.models import FileEntry, Manifest, is_slice
from chroma_snapshots.engine.validation import chunk_ok


def remove_extras(tree: Path, manifest: Manifest) -> None:
    """Delete files, links and directories the manifest does not have (WAL files, scratch)."""
    files = {f.path for f in manifest.files}
    dirs = set(manifest.dirs)
    for p in [*files, *manifest.dirs]:
        parts = p.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for dirpath, dirnames, filenames in os.walk(tree, topdown=False):
        rel = Path(dirpath).relative_to(tree).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        for fn in filenames:
            if prefix + fn not in files:  # its writer may have removed it meanwhile
                Path(dirpath, fn).unlink(missing_ok=True)
        for dn in dirnames:
            full = os.path.join(dirpath, dn)
            if os.path.islink(full):
                Path(full).unlink(missing_ok=True)
            elif prefix + dn not in dirs:
                remove_tree(Path(full))


def damaged_chunks(
    tree: Path, manifest: Manifest, f: FileEntry, bundles: Mapping[str, list[FileEntry]]
) -> list[int]:
    """Bring one file back to the manifest's size and mode and return the indexes of the
    chunks whose bytes differ (a missing file is recreated empty: every chunk differs).
    A bundled file (``bundles``: engine.bundles.members) is checked by putting its bundle
    together from the tree: if that fails its hash, or the file's bytes are not the
    verified bundle's at its place, the file's slice is rewritten."""
    path = tree / f.path
    linked = path.is_file() and not path.is_symlink() and os.lstat(path).st_nlink > 1
    if path.is_symlink() or linked or (path.exists() and not path.is_file()):
        # a link (soft or hard) may lead out of the cache: replaced, never written through
        remove_tree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.truncate(f.size)
    os.chmod(path, f.mode)
    if is_slice(f, manifest.chunks):
        h = f.chunks[0]
        got = rebuild(tree, bundles.get(h, [f]), manifest.chunks[h].size)
        if got is None or not chunk_ok(got, h):
            return [0]
        # the bundle may have been put together without this file (another member with the
        # same bytes at the same place covered them): its own bytes are checked too
        return [] if path.read_bytes() == got[f.at : f.at + f.size] else [0]
    bad = []
    with open(path, "rb") as fh:
        for i, h in enumerate(f.chunks):
            size = manifest.chunks[h].size
            if not chunk_ok(os.pread(fh.fileno(), size, i * manifest.chunk_size), h):
                bad.append(i)
    return bad
