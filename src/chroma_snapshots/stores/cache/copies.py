"""Private copies of cached versions: at a caller's path, or inside the cache for a checkout
while another holds the shared folder; and raw OS errors turned into the documented ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from chroma_snapshots.engine.localfs import (
    copy_tree,
    move_into_place,
    prepare_dest,
    remove_tree,
    work_dir,
)
from chroma_snapshots.engine.placer import disk_error
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.stores.cache.layout import NameDirs, held


def private_copy(src: Path, dest: Path) -> Path:
    """A copy of the cached tree ``src`` at ``dest`` that the caller owns (:func:`built_copy`)."""
    return built_copy(dest, lambda work: copy_tree(src, work))


def built_copy(dest: Path, build: Callable[[Path], None]) -> Path:
    """A tree at ``dest`` that the caller owns, written by ``build`` into a work folder
    beside it (:func:`work_dir`: locked, swept after a kill) and renamed into place:
    nothing is left at ``dest`` on failure."""
    final = prepare_dest(dest)
    try:
        with work_dir(final) as work:
            build(work)
            move_into_place(work, final)
    except BaseException as e:
        raise_local(e, final, "copying to dest")
        raise
    return final


def held_copy(
    d: NameDirs, version: str, build: Callable[[Path], None]
) -> tuple[Path, Callable[[], None]]:
    """A copy of ``version`` of its own for a checkout while another holds the shared
    folder, and what releases it. ``build`` fills the new folder (verifying every chunk).
    Its pin file (``copies/.pins``) is held while the copy lives; a copy whose pin is free
    was left by a killed process (:func:`sweep_copies`)."""
    pin = d.pin_in(d.copies() / ".pins")
    path = d.copies() / f"{version}.{pin.path.name}"

    def release() -> None:
        remove_tree(path)
        pin.unlink(missing_ok=True)

    try:
        path.mkdir()
        build(path)
    except BaseException:
        release()
        raise
    return path, release


def sweep_copies(d: NameDirs) -> None:
    """Remove the private copies whose holder is gone (its pin is free)."""
    folder = d.copies()
    for p in folder.iterdir() if folder.is_dir() else ():
        pin = folder / ".pins" / p.name.split(".", 1)[-1]
        if not p.name.startswith(".") and not held(pin):
            remove_tree(p)
            pin.unlink(missing_ok=True)


def raise_local(e: BaseException, path: Path, what: str) -> None:
    """A raw OSError as CacheFullError (disk full) or LocalDiskError, naming the file that
    failed if the OS said which (of a copy's two, the target), else ``path``; documented
    errors and other exceptions pass."""
    if isinstance(e, OSError) and not isinstance(e, SnapshotError):
        raise disk_error(e, e.filename2 or e.filename or path, what) from e
