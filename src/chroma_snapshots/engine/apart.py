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
below it shows (a filesystem mounted inside a store, reached elsewhere by a bind). An
overlay shows its layers' folders too: the mount table names them in its options
(``lowerdir=``, ``upperdir=``), by the names they were given when it was mounted.

Names can go stale (a layer renamed after the overlay was mounted) and some views of a
folder show in no table (a FUSE file system passing another folder through). So a store's
folder and each store's folder of a cache also hold a marker file, and the walk of a
source refuses one wherever it meets it (engine/source.py): the folder is recognised by
what it holds, whatever shows it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

# The marker files, and what each marks: written when a store's folder is opened for
# writing (backends/fileops.py) and when a cache makes its folder for a store (stores/cache).
STORE_MARKER = ".chroma-snapshots-store"
CACHE_MARKER = ".chroma-snapshots-cache"
MARKED = {STORE_MARKER: "a store's folder", CACHE_MARKER: "a cache's folder"}

Ident = tuple[int, int]  # (st_dev, st_ino)
Where = tuple[str, str]  # (device, path from its filesystem's root): a folder under any name
# (mount point, device, root, the folders an overlay's layers are), from /proc/self/mountinfo
Mount = tuple[str, str, str, tuple[str, ...]]
T = TypeVar("T")


@dataclass(frozen=True)
class Place:
    """A folder: its real path, its own (device, inode) (None while it does not exist),
    and those of every folder above it, itself included. What the mounts show of it is
    read from the mount table at each comparison: mounts come and go after a store opens."""

    path: str
    own: Ident | None
    chain: frozenset[Ident]

    def holds(self, other: Place, mounts: list[Mount] | None = None) -> bool:
        """This folder is ``other`` or one of the folders above it, or a mount below it
        shows ``other`` (a filesystem mounted inside it, reached elsewhere by a bind).
        ``mounts``: a :func:`mount_table` read once for several comparisons."""
        if self.own is None:
            return False
        if self.own in other.chain:
            return True
        table = mount_table() if mounts is None else mounts
        shown = [*_wheres(self.path, table), *_below(self.path, table)]
        return _any_within(_wheres(other.path, table), shown)

    def shows_part_of(self, other: Place, mounts: list[Mount] | None = None) -> bool:
        """A mount at or below this folder shows a folder inside ``other``."""
        table = mount_table() if mounts is None else mounts
        return _any_within(_below(self.path, table), _wheres(other.path, table))

    def overlaps(self, other: Place, mounts: list[Mount] | None = None) -> bool:
        """One of the two folders is, or holds, the other, or shows a part of it."""
        table = mount_table() if mounts is None else mounts  # one read for four questions
        return (
            self.holds(other, table)
            or other.holds(self, table)
            or self.shows_part_of(other, table)
            or other.shows_part_of(self, table)
        )


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


def _any_within(inner: Iterable[Where], outer: Iterable[Where]) -> bool:
    tops = list(outer)
    return any(i[0] == o[0] and _at_or_below(i[1], o[1]) for i in inner for o in tops)


def mount_table() -> list[Mount]:
    """Every mount, in mount order (none without /proc): read it once to compare several
    folders at the same moment."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = [line.rstrip("\n").split(" ", 5) for line in f]
    except OSError:
        return []
    return [
        (_unescape(point), device, _unescape(root), _layers(rest))
        for _, _, device, root, point, rest in lines
    ]


def _layers(rest: str) -> tuple[str, ...]:
    """The absolute names of an overlay's lower and upper folders, from the end of its
    mountinfo line (``... - overlay SOURCE rw,lowerdir=/a:/b,upperdir=/u,...``)."""
    fstype, _, after = rest.partition(" - ")[2].partition(" ")
    if fstype != "overlay":
        return ()
    found: list[str] = []
    for option in after.partition(" ")[2].split(","):
        key, _, value = option.partition("=")
        if key in ("lowerdir", "lowerdir+", "upperdir", "datadir+"):
            found += _split_layers(_unescape(value))
    return tuple(os.path.normpath(name) for name in found if name.startswith("/"))


def _split_layers(value: str) -> list[str]:
    # lower folders are split by ":" ("::" before data-only ones); a backslash escapes a colon
    return [re.sub(r"\\(.)", r"\1", name) for name in re.findall(r"(?:\\.|[^:\\])+", value)]


def _at_or_below(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _wheres(real: str, mounts: list[Mount], depth: int = 0) -> list[Where]:
    """Where the real path ``real`` is: the device and the path from its filesystem's root,
    from the last mount over the longest mount point above it; and, under an overlay, the
    same path in each of its layers (the kernel stacks overlays two deep at most)."""
    best: Mount | None = None
    for m in mounts:
        if _at_or_below(real, m[0]) and (best is None or len(m[0]) >= len(best[0])):
            best = m
    if best is None:
        return []
    point, device, root, layers = best
    rest = real[len(point) :].lstrip("/")
    found = [(device, os.path.join(root, rest) if rest else root)]
    for layer in layers if depth < 3 else ():
        found += _wheres(os.path.join(layer, rest) if rest else layer, mounts, depth + 1)
    return found


def _below(real: str, mounts: list[Mount]) -> list[Where]:
    """What each mount at or below ``real`` shows: its device and root, and its layers'
    folders. Read from the mount table alone, so no folder is touched (one may be on a
    hung mount)."""
    found: list[Where] = []
    for point, device, root, layers in mounts:
        if _at_or_below(point, real):
            found.append((device, root))
            found += [w for layer in layers for w in _wheres(layer, mounts, 1)]
    return found


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
