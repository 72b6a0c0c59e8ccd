"""For tests that reuse a freed inode number: which file system a path is on (ext4 gives a
freed number to the next file or folder made, so there the reuse must really happen)."""

from __future__ import annotations

from pathlib import Path


def fs_type(path: Path) -> str:
    """The type of the file system ``path`` is on (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype = line.split()[:3]
        if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fstype
    return kind
