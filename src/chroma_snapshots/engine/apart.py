"""Telling folders apart by what the kernel says they are, not by their names.

A publish must not read the store it writes to, and a cache must not share a folder with
a store (docs/RELIABILITY.md). Comparing real paths misses a bind mount: ``/view`` bound to
``/data`` makes ``/view/store`` a folder of ``/data`` under another name. So a folder is
known by the (device, inode) of itself and of every folder above it: one folder holds
another when its own pair is among the other's. That chain misses a bind mount of a
folder *inside* another (``/mnt/x`` bound to ``/store/db`` climbs to ``/mnt``, never to
``/store``), so a folder is also known by where it is in its filesystem: the device and
the path from that filesystem's root, which the kernel gives for every mount
(/proc/self/mountinfo), whatever name the folder is reached by, and by what each mount
below it shows (a filesystem mounted inside a store, reached elsewhere by a bind).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

Ident = tuple[int, int]  # (st_dev, st_ino)
Where = tuple[str, str]  # (device, path from its filesystem's root): a folder under any name
Mount = tuple[str, str, str]  # (mount point, device, root), from /proc/self/mountinfo
T = TypeVar("T")


@dataclass(frozen=True)
class Place:
    """A folder: its real path, its own (device, inode) (None while it does not exist),
    and those of every folder above it, itself included. What the mounts show of it is
    read from the mount table at each comparison: mounts come and go after a store opens."""

    path: str
    own: Ident | None
    chain: frozenset[Ident]

    def holds(self, other: Place) -> bool:
        """This folder is ``other`` or one of the folders above it, or a mount below it
        shows ``other`` (a filesystem mounted inside it, reached elsewhere by a bind)."""
        return self._holds(other, _mounts())

    def shows_part_of(self, other: Place) -> bool:
        """A mount at or below this folder shows a folder inside ``other``."""
        return self._shows_part_of(other, _mounts())

    def overlaps(self, other: Place) -> bool:
        """One of the two folders is, or holds, the other, or shows a part of it."""
        mounts = _mounts()  # one read of the mount table for the four questions
        return (
            self._holds(other, mounts)
            or other._holds(self, mounts)
            or self._shows_part_of(other, mounts)
            or other._shows_part_of(self, mounts)
        )

    def _holds(self, other: Place, mounts: list[Mount]) -> bool:
        if self.own is None:
            return False
        if self.own in other.chain:
            return True
        inner = _where(other.path, mounts)
        shown = [_where(self.path, mounts), *_below(self.path, mounts)]
        return any(_within(inner, outer) for outer in shown)

    def _shows_part_of(self, other: Place, mounts: list[Mount]) -> bool:
        outer = _where(other.path, mounts)
        return any(_within(shown, outer) for shown in _below(self.path, mounts))


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


def _within(inner: Where | None, outer: Where | None) -> bool:
    if inner is None or outer is None or inner[0] != outer[0]:
        return False
    return _at_or_below(inner[1], outer[1])


def _mounts() -> list[Mount]:
    """(mount point, device, root) of every mount, in mount order; none without /proc."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            fields = [line.split(" ", 5)[2:5] for line in f]
    except OSError:
        return []
    return [(_unescape(point), device, _unescape(root)) for device, root, point in fields]


def _at_or_below(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _where(real: str, mounts: list[Mount]) -> Where | None:
    """The device and the path from its filesystem's root of the real path ``real``, from
    the last mount over the longest mount point above it."""
    best: tuple[str, str, str] | None = None
    for point, device, root in mounts:
        if _at_or_below(real, point) and (best is None or len(point) >= len(best[0])):
            best = (point, device, root)
    if best is None:
        return None
    point, device, root = best
    rest = real[len(point) :].lstrip("/")
    return device, os.path.join(root, rest) if rest else root


def _below(real: str, mounts: list[Mount]) -> tuple[Where, ...]:
    """What each mount at or below ``real`` shows: its device and root. Read from the
    mount table alone, so no folder is touched (one may be on a hung mount)."""
    return tuple((device, root) for point, device, root in mounts if _at_or_below(point, real))


def _unescape(field: str) -> str:
    # mountinfo writes a space, tab, newline and backslash as an octal escape (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


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
