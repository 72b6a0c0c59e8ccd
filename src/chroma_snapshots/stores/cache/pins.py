"""Pin files: a file a live process holds a shared ``flock`` on. The lock, not a pid, says
the holder lives: the kernel drops it when the process dies, whatever PID namespace it ran
in (a container sharing the cache folder sees other pids, or none). A consumer's hold on a
version, a private copy's, and a claim on the cache's room (room.py) are pins."""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from pathlib import Path

from chroma_snapshots.engine.localfs import LEFTOVER_AGE
from chroma_snapshots.engine.placer import pwrite_all


class Pin:
    """A held pin file (:func:`make_pin`); ``unlink`` lets it go (idempotent)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def unlink(self, missing_ok: bool = True) -> None:
        """Release the pin: remove its file, then drop its lock."""
        self.path.unlink(missing_ok=True)
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def held(path: Path) -> bool:
    """Whether a live process holds the pin file at ``path`` (its shared lock is taken)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got it
    return False


def drop_unborn(path: Path) -> None:
    """Remove the hidden pin file ``path`` if its maker died before renaming it into view:
    not held, and older than any maker takes (one being made is locked before its rename
    but for an instant, which the age covers)."""
    try:
        if time.time() - os.lstat(path).st_mtime < LEFTOVER_AGE:
            return
    except OSError:
        return
    if not held(path):
        path.unlink(missing_ok=True)


def live_pins(folder: Path) -> list[Path]:
    """The pin files in ``folder`` that a live process holds; dead holders' are removed
    (and unborn ones past their age: :func:`drop_unborn`)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    live = []
    for name in names:
        if name.startswith("."):
            drop_unborn(folder / name)
        elif held(folder / name):
            live.append(folder / name)
        else:  # unlinked by its holder meanwhile is fine too
            (folder / name).unlink(missing_ok=True)
    return live


def make_pin(pins: Path, content: bytes = b"") -> Pin:
    """A held pin file in the folder ``pins``, holding ``content``."""
    pins.mkdir(parents=True, exist_ok=True)
    name = f"{os.getpid()}-{uuid.uuid4().hex}"
    tmp = pins / f".{name}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if content:
            pwrite_all(fd, [content], 0, len(content))
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.rename(tmp, pins / name)  # visible only once locked: never seen as dead
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return Pin(pins / name, fd)
