"""Private copies of cached versions: at a caller's path, or inside the cache for a checkout
while another holds the shared folder; and raw OS errors turned into the documented ones."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

from chroma_snapshots.engine.beneath import REPLACED, FolderId
from chroma_snapshots.engine.cleanup import clean_up
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.folders import (
    Made,
    folder_id,
    new_folder,
    remove_tree,
    sweepable,
)
from chroma_snapshots.engine.treewalk import mounts_within
from chroma_snapshots.errors import LocalDiskError
from chroma_snapshots.stores.cache.layout import NameDirs
from chroma_snapshots.stores.cache.pins import Pin, held, live_pins


def held_copy(
    d: NameDirs,
    version: str,
    pin: Pin,
    build: Callable[[Path, FolderId], None],
    deadline: Deadline,
) -> tuple[Path, Callable[[], None]]:
    """A copy of ``version`` of its own for a checkout while another holds the shared
    folder, and what releases it. ``build`` fills the new folder (verifying every chunk);
    if ``deadline`` has passed by then, the copy is removed, not delivered (on a slow
    disk maybe after the call returns: engine/cleanup.py).
    Its pin file ``pin`` (in ``copies/.pins``, the copy's claim on the cache's room: taken
    before this call, given back at release) is held while the copy lives; a copy whose
    pin is free was left by a killed process (:func:`sweep_copies`). A folder another
    process swaps in under its name is neither written into, served nor removed (its
    device and inode)."""
    made: list[Made] = []  # named for itself, and held open while it lives

    def release() -> None:
        if made:
            made[0].remove()
        pin.unlink(missing_ok=True)

    try:
        made.append(new_folder(d.copies() / f"{version}.{pin.path.name}"))
        path = made[0].path
        build(path, made[0].id)
        deadline.check(f"copying {version}")
        if folder_id(path) != made[0].id or mounts_within(path):  # (as folders.landed)
            raise LocalDiskError(errno.ESTALE, REPLACED, str(path))
    except BaseException:
        clean_up(release, deadline.remaining())
        raise
    return path, release


_COPY_STEM = r"[^./]+\.\d+-[0-9a-f]{32}"  # <version>.<its pin's name>: what held_copy names


def copy_pin(name: str) -> str | None:
    """The name of the pin (in ``copies/.pins``) of the private copy named ``name``
    (``<version>.<pin>``, then what new_folder adds), or None if ``name`` is not one of a
    copy's (:func:`held_copy` names them)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] and parts[1] else None


def sweep_copies(d: NameDirs) -> None:
    """Remove the private copies whose holder is gone (its pin is free): each only if it
    is the folder made there (engine/folders.sweepable); then the dead pins."""
    for name in d.names("copies"):
        pin = copy_pin(name)
        if pin is None or held(d.copies() / ".pins" / pin):  # (checked after the listing)
            continue
        if (made := sweepable(d.copies() / name, _COPY_STEM)) is not None:
            remove_tree(d.copies() / name, only=made)
    live_pins(d.copies() / ".pins", d.root.parent)  # drops dead and unborn pins
