"""Room in the cache claimed by work in progress, so that processes making room at the same
moment count each other's work.

Making room is: count what the cache holds, evict until the new work fits, start it. Two
processes doing that at once each counted only what was cached, not the other's build, and
together could pass ``max_bytes`` by a version. So the count, the eviction and the claim
happen under the cache's room lock (``.room.lock`` in the store's cache folder), and a
claim is a pin file (a shared ``flock`` the kernel drops when its holder dies:
pins.make_pin) holding the bytes the work will hold once done:

- a new version's build claims in ``building/<version>/`` until its tree has landed (from
  then on its manifest counts it; the claim goes a moment later and is not counted twice);
- a private copy's claim is the copy's own pin (``copies/.pins``), for as long as it lives.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from filelock import FileLock

from chroma_snapshots.engine.treewalk import walk
from chroma_snapshots.stores.cache.copies import copy_pin
from chroma_snapshots.stores.cache.layout import NameDirs
from chroma_snapshots.stores.cache.owned import listed, open_folder, own_lock_file
from chroma_snapshots.stores.cache.pins import Pin, live_pins, make_pin

ROOM_LOCK = ".room.lock"
BUILDING = "building"


def room_lock(root: Path) -> FileLock:
    """The lock under which one process at a time counts a cache and claims room in it
    (its file repaired first: owned.own_lock_file)."""
    return FileLock(own_lock_file(root / ROOM_LOCK))


def claim(pins: Path, d: NameDirs, nbytes: int) -> Pin:
    """A held claim of ``nbytes`` in the folder ``pins``; ``unlink`` gives it back."""
    return make_pin(pins, d.root.parent, str(nbytes).encode())


def claim_build(d: NameDirs, version: str, nbytes: int) -> Pin:
    """The claim of a build of ``version`` (made with the version's lock held: one builder
    of a version at a time); :func:`end_build` gives it back."""
    return claim(d.root / BUILDING / version, d, nbytes)


def end_build(d: NameDirs, room: Pin) -> None:
    """Give a build's claim back, and its folder (with the version's lock still held: no
    other claim can be on its way in), removed through ``building/``'s descriptor: never
    through a link put at that name."""
    room.unlink()
    drop_build_folder(d, room.path.parent.name)


def drop_build_folder(d: NameDirs, version: str) -> None:
    """Remove ``building/<version>`` if empty (with the version's lock held), through
    ``building/``'s descriptor; one still holding a dead builder's claim is left to
    :func:`live_build_claims`, then to the next sweep."""
    folder = open_folder(d.root / BUILDING, d.root.parent)
    if folder is None:
        return
    try:
        with contextlib.suppress(OSError):  # not empty
            os.rmdir(version, dir_fd=folder)
    finally:
        os.close(folder)


def idle_builds(d: NameDirs) -> list[str]:
    """Versions whose folder in ``building/`` holds no live claim: its builder died or was
    interrupted between giving its claim back and removing the folder."""
    folder, below = d.root / BUILDING, d.root.parent
    return [v for v in listed(folder, below) if not live_pins(folder / v, below)]


def live_build_claims(d: NameDirs) -> dict[str, int]:
    """Bytes claimed by the live builds of each version of ``d``; dead builders' claims are
    removed. Read these before the complete versions: a build that lands in between is
    then counted once, by its manifest, never by neither."""
    folder, below = d.root / BUILDING, d.root.parent
    found = {v: live_pins(folder / v, below).values() for v in listed(folder, below)}
    return {v: total for v, ns in found.items() if (total := sum(n or 0 for n in ns))}


def copies_bytes(d: NameDirs) -> int:
    """Bytes of the private copies of ``d``: what each live copy claimed (from before its
    first byte is written), and as found on disk any copy without a counted claim (its
    holder died: swept at the next open)."""
    below = d.root.parent
    pins = live_pins(d.copies() / ".pins", below)
    counted = {name: n for name, n in pins.items() if n is not None}
    total = sum(counted.values())
    for name in listed(d.copies(), below):
        if not name.startswith(".") and copy_pin(name) not in counted:
            total += tree_bytes(d.copies() / name)
    return total


def tree_bytes(folder: Path) -> int:
    """Bytes of the files below ``folder`` (0 if it is gone)."""
    total = 0
    for dirpath, _, filenames in walk(folder):  # a consumer's folders: any depth
        for fn in filenames:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(dirpath, fn)).st_size
    return total
