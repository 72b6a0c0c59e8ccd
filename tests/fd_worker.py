"""Runs out of file descriptors on purpose, in its own process (no other thread of a test
run opens files meanwhile): tests/test_descriptor_exhaustion.py.

usage: fd_worker.py looks FOLDER           Beneath and remove_dir with one descriptor free
       fd_worker.py waits FOLDER           remove_mine while none is free, freed later
       fd_worker.py checkout STORE DEST N HOW  a checkout with N descriptors free: HOW is
           "store", "drop" (the store drops what it writes behind it), "cache" (through
           a cache beside DEST) or "cache-dest" (through it, copied to DEST)
Prints one JSON object: what happened, and the descriptors open before and after.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from chroma_snapshots import CachedStore, RemoteStore, wait_for_cleanups
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.beneath import Beneath
from chroma_snapshots.engine.folders import folder_id, remove_mine
from chroma_snapshots.engine.treewalk import remove_dir
from chroma_snapshots.errors import SnapshotError


def open_fds() -> list[str]:
    """This process's open descriptors and what they name (the listing's own left out)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return sorted(found)


def fill(free: int) -> list[int]:
    """Open /dev/null until the limit, then close ``free`` of them again."""
    held: list[int] = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        pass
    for _ in range(free):
        os.close(held.pop())
    return held


def release(held: list[int]) -> None:
    for fd in held:
        os.close(fd)


def looks(folder: Path) -> dict[str, object]:
    said: dict[str, object] = {}
    held = fill(1)
    try:
        Beneath(folder)
        said["beneath"] = "opened"
    except OSError as e:
        said["beneath"] = e.__class__.__name__
    remove_dir(folder)  # must not raise: errors leave the folder as it is
    try:  # the one free descriptor is free again
        os.close(os.open("/dev/null", os.O_RDONLY))
        said["free_after"] = True
    except OSError:
        said["free_after"] = False
    release(held)
    said["folder_left"] = folder.exists()
    return said


def waits(folder: Path) -> dict[str, object]:
    built = folder_id(folder)
    assert built is not None
    held = fill(0)
    threading.Timer(0.3, release, [held]).start()
    remove_mine(folder, built)
    return {"folder_left": folder.exists()}


def checkout(store_dir: Path, dest: Path, free: int, how: str) -> dict[str, object]:
    remote = RemoteStore(FileBackend(store_dir), drop_behind=how == "drop")
    cache = dest.with_name("cache")
    store = CachedStore(remote, cache) if how.startswith("cache") else remote
    said: dict[str, object] = {}
    held = fill(free)
    try:
        if how == "cache":
            store.checkout("db").release()
        else:
            store.checkout("db", dest=dest)
        said["result"] = "ok"
    except SnapshotError as e:
        said["result"] = e.__class__.__name__
    release(held)
    said["cleaned_up"] = wait_for_cleanups(30)
    store.close()
    said["beside"] = sorted(p.name for p in dest.parent.iterdir() if p != cache)
    work = [p for sub in ("tmp", "building") for p in cache.glob(f"*/db/{sub}/*")]
    said["in_cache"] = sorted(str(p.relative_to(cache)) for p in work)
    return said


if __name__ == "__main__":
    before = open_fds()
    op, *args = sys.argv[1:]
    if op == "looks":
        out = looks(Path(args[0]))
    elif op == "waits":
        out = waits(Path(args[0]))
    else:
        out = checkout(Path(args[0]), Path(args[1]), int(args[2]), args[3])
    time.sleep(0.2)  # threads a failure abandoned close what they hold as they end
    print(json.dumps(out | {"leaked": sorted(set(open_fds()) - set(before))}))
