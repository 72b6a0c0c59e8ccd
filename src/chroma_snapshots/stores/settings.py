"""Checks of a RemoteStore's settings, made when the store is made or a publish starts:
a setting it would misuse is InvalidInputError there, never a failure mid-transfer."""

from __future__ import annotations

import zstandard

from chroma_snapshots.engine.deadline import MAX_SECONDS
from chroma_snapshots.engine.validation import MAX_CHUNK_SIZE, MAX_PACK_SIZE, number_in, path_text
from chroma_snapshots.errors import InvalidInputError, shown

MAX_WORKERS = 1024  # 8 GiB of read buffers at 8 MiB each
# A pack is sealed once it reaches the target, so it can hold one chunk more: never past
# what a manifest may address (MAX_PACK_SIZE).
MAX_PACK_TARGET = MAX_PACK_SIZE - MAX_CHUNK_SIZE
# zstd's levels: 1 to 22, 0 its default (3), negative the fast ones down to -(1 << 17)
ZSTD_LEVELS = (-(1 << 17), zstandard.MAX_COMPRESSION_LEVEL)


def check_settings(
    workers: object, pack_target: object, compression_level: object, default_timeout: object
) -> None:
    """InvalidInputError for a RemoteStore setting it would misuse, said when the store is
    made: 0 workers left every publish waiting for a pool that never ran its work until the
    deadline, a pack target or level zstd or readers refuse failed mid-publish, and a bool
    was taken for a number (True workers, one second)."""
    if type(workers) is not int or not 1 <= workers <= MAX_WORKERS:
        raise InvalidInputError(
            f"workers must be a whole number from 1 to {MAX_WORKERS}, not {shown(workers)}"
        )
    if type(pack_target) is not int or not 1 <= pack_target <= MAX_PACK_TARGET:
        raise InvalidInputError(
            f"pack_target must be a whole number of bytes from 1 to {MAX_PACK_TARGET}, "
            f"not {shown(pack_target)}"
        )
    low, high = ZSTD_LEVELS
    level = compression_level
    if level is not None and (type(level) is not int or not low <= level <= high):
        raise InvalidInputError(
            f"compression_level must be None (store raw) or a zstd level, a whole number "
            f"from {low} to {high}, not {shown(level)}"
        )
    if not number_in(default_timeout, 0, MAX_SECONDS, low_ok=False):
        raise InvalidInputError(
            f"default_timeout must be a number of seconds, positive and at most "
            f"{MAX_SECONDS:.0e}, not {shown(default_timeout)}"
        )


def check_parent_dir(parent_dir: object) -> None:
    """``publish``'s ``parent_dir``: None, a folder's path or a function to one, else
    InvalidInputError (``123`` was a raw TypeError once the parent's manifest was read)."""
    if not (parent_dir is None or callable(parent_dir) or path_text(parent_dir) is not None):
        raise InvalidInputError(
            f"parent_dir must be a folder, a function to one or None, not {shown(parent_dir)}"
        )
