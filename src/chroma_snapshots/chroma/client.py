"""The life of a chroma client: the settings of those this package opens, the folder a
caller's client persists to, and a close that leaves nothing of it in chroma's
process-wide cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from chromadb.api.shared_system_client import SharedSystemClient
from chromadb.config import Settings

from chroma_snapshots.errors import InvalidInputError

SQLITE = "chroma.sqlite3"


def client_settings() -> Settings:
    """Settings for clients this package opens: no telemetry, no reset."""
    return Settings(anonymized_telemetry=False, allow_reset=False, is_persistent=True)


def close_client(client: Any) -> None:
    """Close a client and evict its system from chroma's shared cache (stopping it)."""
    identifier = client._identifier
    client.close()
    with SharedSystemClient._refcount_lock:
        system = SharedSystemClient._identifier_to_system.pop(identifier, None)
        SharedSystemClient._identifier_to_refcount.pop(identifier, None)
    if system is not None:
        system.stop()


def client_folder(client: Any) -> Path:
    """The folder ``client`` persists to, read while it is still open. InvalidInputError
    for an in-memory client (its data is in no folder: what is at its nominal
    ``./chroma`` is someone else's) and for a relative path this process holds two
    databases open under. A relative path is the database the client holds open under
    it, wherever the working directory has moved since (chroma resolved it when the
    client opened); the working directory's reading only when it holds none (no /proc)."""
    settings = client.get_settings()
    if not settings.is_persistent:
        raise InvalidInputError(
            "publish_client needs a client that persists to a folder "
            "(chromadb.PersistentClient): this one keeps its data in memory (or on a chroma "
            "server), so no folder here holds it; the client was left open"
        )
    folder = Path(settings.persist_directory)
    if folder.is_absolute():
        return folder
    held = _held_databases(Path(os.path.normpath(folder)))
    if len(held) > 1:
        raise InvalidInputError(
            f"publish_client: the client's folder {str(folder)!r} is relative, and this "
            f"process holds databases open in {len(held)} folders of that name "
            f"({', '.join(sorted(map(str, held.values())))}): pass the folder, or open "
            "the client with an absolute path"
        )
    return next(iter(held.values()), folder.absolute())


def _held_databases(folder: Path) -> dict[tuple[int, int], Path]:
    """The folders ending in ``folder`` whose chroma database this process holds open,
    by the database file's identity (device, inode): chroma keeps its sqlite file open
    while a client lives. None found without /proc (not Linux)."""
    found: dict[tuple[int, int], Path] = {}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if target.name != SQLITE or target.parent.parts[-len(folder.parts) :] != folder.parts:
                continue
            st = os.stat(f"/proc/self/fd/{fd}")
        except OSError:  # closed since it was listed, or not a file
            continue
        found[(st.st_dev, st.st_ino)] = target.parent
    return found
