"""The checks a publish makes of its input before it reads a byte (the metadata and
message as readers will see them, the source folder named and kept apart from every
store's and cache's), whether its tree is its parent's, and who publishes."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path

from chroma_snapshots.engine.apart import (
    Ident,
    KeptOut,
    also_source,
    kept_out,
    mount_table,
    place_of,
)
from chroma_snapshots.engine.models import FileEntry, Manifest, file_key
from chroma_snapshots.engine.validation import (
    MAX_METADATA_DEPTH,
    check_depth,
    path_text,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError, shown


# Below this many bytes a batch is hashed on the calling thread.
def checked_metadata(metadata: object) -> dict[str, object]:
    """``publish(metadata=...)`` as readers will see it (JSON: tuples become lists, keys
    strings), or InvalidInputError for anything JSON cannot hold or nested deeper than a
    manifest may be, never a TypeError or RecursionError."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"metadata must be a dict, not {type(metadata).__name__}")
    try:
        check_depth(metadata, "metadata", MAX_METADATA_DEPTH)  # first: it ends on cycles too
        text = json.dumps(metadata, allow_nan=False, ensure_ascii=False)
        text.encode()  # a lone surrogate ("\udcff") has no UTF-8: the manifest could not hold it
        normal: dict[str, object] = json.loads(text)
    except IntegrityError as e:
        raise InvalidInputError(str(e)) from e
    except (TypeError, ValueError, RecursionError) as e:  # NaN, a huge int, deep tuples
        raise InvalidInputError(f"metadata is not JSON: {e}") from e
    return normal


def checked_message(message: object) -> str | None:
    """``publish(message=...)``: None or text the manifest can hold (UTF-8), else
    InvalidInputError (a lone surrogate from a shell's undecodable bytes raised
    UnicodeEncodeError from the manifest's encoding)."""
    if message is None:
        return None
    if not isinstance(message, str):
        raise InvalidInputError(f"message must be text, not {type(message).__name__}")
    try:
        message.encode()
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"message is not valid text: {e}") from None
    return message


def checked_source(source_dir: str | Path) -> str | Path:
    """``publish``'s ``source_dir``, or InvalidInputError: an empty string (which ``Path``
    reads as the working directory: a publish of whatever folder the process ran in) or
    something that is no path (None, bytes: a raw TypeError from ``Path``)."""
    path = path_text(source_dir)
    if path is None:
        raise InvalidInputError(f"source directory {shown(source_dir)} is not a path")
    if not path:
        raise InvalidInputError("source directory is empty: name a folder ('.' for this one)")
    return source_dir


def check_apart(source_dir: str | Path, extra: Sequence[KeptOut] = ()) -> dict[Ident, str]:
    """InvalidInputError if the source (or a folder it was copied from, apart.published_from)
    is or holds a folder the publish must keep out (``extra`` and apart.kept_out: the
    store's, a mirror's, the cache's), or lies inside a store's: each publish would copy
    that folder's contents, earlier versions included, into the new version, and read files
    its own clean-ups remove. Folders are compared as the kernel knows them (engine/apart.py).
    Returns the kept-out folders' own (device, inode) for the walk of the source to refuse
    (one bound below the source under another name is found only there)."""
    folders = (*kept_out(), *extra)
    mounts = mount_table()  # once: every comparison below at the same moment
    for path in (os.fspath(source_dir), *also_source()):
        source = place_of(path)
        for k in folders:
            if source.holds(k.place, mounts):
                raise InvalidInputError(
                    f"{k.what} {k.place.path} is inside the folder being published "
                    f"({source.path}): publish a folder that does not hold it"
                )
            if source.shows_part_of(k.place, mounts):
                raise InvalidInputError(
                    f"a folder inside {k.what} {k.place.path} is mounted in the folder being "
                    f"published ({source.path}): publish a folder that does not hold it"
                )
            if k.both_ways and k.place.holds(source, mounts):
                raise InvalidInputError(
                    f"the folder being published ({source.path}) is inside {k.what} "
                    f"{k.place.path}: publish a folder outside it"
                )
    return {k.place.own: k.what for k in folders if k.place.own is not None}


def same_tree(parent: Manifest, entries: Sequence[FileEntry], dirs: Sequence[str]) -> bool:
    """The files (paths, sizes, modes, chunks) and empty directories are the parent's: a
    publish with no change (see ``allow_empty``)."""
    if tuple(dirs) != parent.dirs or len(entries) != len(parent.files):
        return False
    if tuple(entries) == parent.files:
        return True
    # a parent whose chunk ids are of the other length (written before format 2 layout 3)
    return all(file_key(a) == file_key(b) for a, b in zip(entries, parent.files, strict=True))


def publisher_id() -> str:
    """host:pid:random, recorded in each manifest."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
