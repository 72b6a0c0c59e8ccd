"""Telling folders apart by what the kernel says they are, not by their names.

A publish must not read the store it writes to, and a cache must not share a folder with
a store (docs/RELIABILITY.md). Comparing real paths misses a bind mount: ``/view`` bound to
``/data`` makes ``/view/store`` a folder of ``/data`` under another name. So a folder is
known by the (device, inode) of itself and of every folder above it: one folder holds
another when its own pair is among the other's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

Ident = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class Place:
    """A folder: its real path, its own (device, inode) (None while it does not exist),
    and those of every folder above it, itself included."""

    path: str
    own: Ident | None
    chain: frozenset[Ident]

    def holds(self, other: Place) -> bool:
        """This folder is ``other`` or one of the folders above it."""
        return self.own is not None and self.own in other.chain

    def overlaps(self, other: Place) -> bool:
        """One of the two folders is, or holds, the other."""
        return self.holds(other) or other.holds(self)


def place_of(path: str | os.PathLike[str]) -> Place:
    """``path`` as a :class:`Place`. A folder not made yet is known by the folders above
    it that exist. Runs ``stat`` on every folder up to ``/``: call it where the disk
    answers (a file store on a mount does it through its hang guard)."""
    real = os.path.realpath(path)
    chain: set[Ident] = set()
    own: Ident | None = None
    here = real
    while True:
        try:
            st = os.stat(here)
        except OSError:
            st = None
        if st is not None:
            chain.add((st.st_dev, st.st_ino))
            if here == real:
                own = (st.st_dev, st.st_ino)
        parent = os.path.dirname(here)
        if parent == here:
            return Place(real, own, frozenset(chain))
        here = parent
