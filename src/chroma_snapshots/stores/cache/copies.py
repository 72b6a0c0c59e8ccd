"""What a cache does on local disk outside its own folder: a private copy of a cached
version at a caller's path, and raw OS errors turned into the documented ones."""

from __future__ import annotations

from pathlib import Path

from chroma_snapshots.engine.localfs import copy_tree, move_into_place, prepare_dest, work_dir
from chroma_snapshots.engine.placer import disk_error
from chroma_snapshots.errors import SnapshotError


def private_copy(src: Path, dest: Path) -> Path:
    """A copy of the cached tree ``src`` at ``dest`` that the caller owns, built in a work
    folder beside it (:func:`work_dir`: locked, swept after a kill) and renamed into place:
    nothing is left at ``dest`` on failure."""
    final = prepare_dest(dest)
    try:
        with work_dir(final) as work:
            copy_tree(src, work)
            move_into_place(work, final)
    except BaseException as e:
        raise_local(e, final, "copying to dest")
        raise
    return final


def raise_local(e: BaseException, path: Path, what: str) -> None:
    """A raw OSError as CacheFullError (disk full) or LocalDiskError, naming the file that
    failed if the OS said which (of a copy's two, the target), else ``path``; documented
    errors and other exceptions pass."""
    if isinstance(e, OSError) and not isinstance(e, SnapshotError):
        raise disk_error(e, e.filename2 or e.filename or path, what) from e
