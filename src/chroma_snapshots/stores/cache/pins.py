"""Pin files: a file a live process holds a shared ``flock`` on. The lock, not a pid, says
the holder lives: the kernel drops it when the process dies, whatever PID namespace it ran
in (a container sharing the cache folder sees other pids, or none). A consumer's hold on a
version, a private copy's, and a claim on the cache's room (room.py) are pins."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
import uuid
from pathlib import Path

from chroma_snapshots.engine.placer import pwrite_all
from chroma_snapshots.engine.workdir import LEFTOVER_AGE
from chroma_snapshots.stores.cache.owned import open_folder, own_folder


class Pin:
    """A held pin file (:func:`make_pin`); ``unlink`` lets it go (idempotent). It keeps
    its folder open, so that the file removed is the one made, whatever stands at the
    folder's name by then (a link put there is not followed)."""

    def __init__(self, path: Path, fd: int, folder: int) -> None:
        self.path = path
        self._fds: tuple[int, int] | None = (fd, folder)

    def unlink(self, missing_ok: bool = True) -> None:
        """Release the pin: remove its file, then drop its lock."""
        fds, self._fds = self._fds, None
        if fds is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path.name, dir_fd=fds[1])
        finally:
            os.close(fds[0])
            os.close(fds[1])


_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never a link, a FIFO's wait
_MAX_COUNT = 20  # digits of the largest byte count a claim holds (2**63)
_MAKE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def held(path: Path | str, dir_fd: int | None = None) -> bool:
    """Whether a live process holds the pin file at ``path`` (its shared lock is taken);
    anything but a regular file there (a link, a FIFO, a folder) is no pin."""
    try:
        fd = os.open(path, _OPEN, dir_fd=dir_fd)
    except PermissionError:  # unreadable (its mode changed by hand): it may be held, so
        return True  # it is neither removed nor its version evicted
    except OSError:  # gone, a link (ELOOP): no live pin of ours
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got it
    return False


def _count(name: str, dir_fd: int) -> int | None:
    """The byte count a claim holds; None if it holds none (a pin made without one)."""
    try:
        fd = os.open(name, _OPEN, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        text = os.read(fd, _MAX_COUNT + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and len(text) <= _MAX_COUNT else None


def _drop(name: str, dir_fd: int) -> None:
    """Remove a dead pin (or what stands at a pin's name: an empty folder too)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except IsADirectoryError:
        with contextlib.suppress(OSError):  # not empty: left alone, and never counted
            os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        pass  # unlinked by its holder meanwhile, or not ours to remove


def drop_unborn(path: Path | str, dir_fd: int | None = None) -> None:
    """Remove the hidden pin file ``path`` if its maker died before renaming it into view:
    not held, and older than any maker takes (one being made is locked before its rename
    but for an instant, which the age covers)."""
    try:
        if time.time() - os.lstat(path, dir_fd=dir_fd).st_mtime < LEFTOVER_AGE:
            return
    except OSError:
        return
    if not held(path, dir_fd):
        with contextlib.suppress(OSError):
            os.unlink(path, dir_fd=dir_fd)


def live_pins(folder: Path, below: Path) -> dict[str, int | None]:
    """The pin files in ``folder`` (below the trusted ``below``: no link followed) that a
    live process holds, each with the byte count it holds (a claim's: room.py) or None;
    dead holders' are removed (and unborn ones past their age: :func:`drop_unborn`)."""
    fd = open_folder(folder, below)
    if fd is None:
        return {}
    try:
        live: dict[str, int | None] = {}
        for name in os.listdir(fd):
            if name.startswith("."):
                drop_unborn(name, fd)
            elif held(name, fd):
                live[name] = _count(name, fd)
            else:
                _drop(name, fd)
        return live
    finally:
        os.close(fd)


def make_pin(pins: Path, below: Path, content: bytes = b"") -> Pin:
    """A held pin file in the folder ``pins`` (made below ``below`` if missing, never
    through a link), holding ``content``."""
    folder = open_folder(own_folder(pins, below), below)
    if folder is None:  # replaced by a link or a file this very moment
        raise NotADirectoryError(errno.ENOTDIR, "not a folder of the cache's", str(pins))
    name = f"{os.getpid()}-{uuid.uuid4().hex}"
    fd = -1
    try:
        fd = os.open(f".{name}", _MAKE, 0o600, dir_fd=folder)
        if content:
            pwrite_all(fd, [content], 0, len(content))
        fcntl.flock(fd, fcntl.LOCK_SH)
        # visible only once locked: never seen as dead
        os.rename(f".{name}", name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        if fd >= 0:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(f".{name}", dir_fd=folder)
        os.close(folder)
        raise
    return Pin(pins / name, fd, folder)
