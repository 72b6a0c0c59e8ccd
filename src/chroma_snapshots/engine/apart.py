"""Telling folders apart by what the kernel says they are, not by their names.

A publish must not read the store it writes to, and a cache must not share a folder with
a store (docs/RELIABILITY.md). Comparing real paths misses a bind mount: ``/view`` bound to
``/data`` makes ``/view/store`` a folder of ``/data`` under another name. So a folder is
known by the (device, inode) of itself and of every folder above it: one folder holds
another when its own pair is among the other's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

Ident = tuple[int, int]  # (st_dev, st_ino)
T = TypeVar("T")


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


@dataclass(frozen=True)
class KeptOut:
    """A folder a publish must not read: ``what`` names it in the error; ``both_ways``:
    a source inside it is refused too (a store's folder; a cache's may hold a checkout
    that is published again)."""

    place: Place
    what: str
    both_ways: bool


def store_folder(place: Place) -> KeptOut:
    """A store's folder, to keep out of a publish's source (and the source out of it)."""
    return KeptOut(place, "the store's folder", both_ways=True)


# Set by each layer a publish passes through (a cache, a fallback, a store), read where the
# source is checked and walked: a layer cannot hand the next one an argument it lacks.
_KEPT_OUT: ContextVar[tuple[KeptOut, ...]] = ContextVar("kept_out", default=())
_ALSO_SOURCE: ContextVar[tuple[str, ...]] = ContextVar("also_source", default=())


@contextmanager
def _extended(var: ContextVar[tuple[T, ...]], items: Iterable[T]) -> Iterator[None]:
    token = var.set(var.get() + tuple(items))
    try:
        yield
    finally:
        var.reset(token)


def keep_out(folders: Iterable[KeptOut]) -> AbstractContextManager[None]:
    """Within the block, a publish refuses a source that overlaps one of ``folders``."""
    return _extended(_KEPT_OUT, folders)


def published_from(path: str | os.PathLike[str]) -> AbstractContextManager[None]:
    """Within the block, a publish of a copy is checked as a publish of ``path`` too (a
    chroma database copied to a temporary folder first)."""
    return _extended(_ALSO_SOURCE, [os.fspath(path)])


def kept_out() -> tuple[KeptOut, ...]:
    """The folders the publish under way must keep out of its source."""
    return _KEPT_OUT.get()


def also_source() -> tuple[str, ...]:
    """The folders the source under way was copied from."""
    return _ALSO_SOURCE.get()
