"""Local directory helpers shared by checkouts, the cache and the chroma integration."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from chroma_snapshots.errors import InvalidInputError


def prepare_dest(dest: str | Path | None) -> Path:
    """The absolute checkout destination: absent or an empty directory, parent created."""
    if dest is None:
        return Path(tempfile.mkdtemp(prefix="chroma-snapshot-")) / "snapshot"
    final = Path(dest).absolute()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise InvalidInputError(f"checkout destination {str(final)!r} exists and is not empty")
    final.parent.mkdir(parents=True, exist_ok=True)
    return final


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists (temp folders, failed checkouts)."""
    shutil.rmtree(path, ignore_errors=True)


def copy_tree(src: Path, dst: Path) -> None:
    """``shutil.copytree`` without its error collecting: the first OSError (ENOSPC above
    all) is raised as itself. For trees of files and directories (cached versions, a
    chroma database)."""
    made = []
    for dirpath, _, filenames in os.walk(src):
        target = dst / Path(dirpath).relative_to(src)
        target.mkdir()
        made.append((Path(dirpath), target))
        for fn in filenames:
            shutil.copy2(os.path.join(dirpath, fn), target / fn)  # loops on short writes
    for source, target in reversed(made):  # modes and times once nothing more is added
        shutil.copystat(source, target)
