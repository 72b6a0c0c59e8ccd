"""What a store's folders look like, for the walk of a publish's source to refuse them
however they show there: names and mounts (engine/apart.py) do not see every view of a
folder (an overlay whose layer was renamed, a FUSE file system passing it through, a copy).

Four signs, each found in a folder's listing alone (no syscall of its own):
- an entry named as a store's or a cache's marker file (apart.MARKED), of any kind;
- a store's name folder: ``manifests``, ``packs`` and ``refs`` folders side by side (what
  a view that hides the markers still shows, and a copy made without dot files holds);
- a cache's name folder: ``building``, ``meta`` and ``versions`` folders side by side
  (stores/cache/layout.py; its marker is a level up);
- a store's ``packs/ab`` folder: named by two hex digits, holding a file named by 64 that
  start with them (a view of a store's packs alone).
A source holding any of them is refused, naming it (a folder of the user's own that looks
so is refused too: the error says what to move).
"""

from __future__ import annotations

import os

from chroma_snapshots.engine.apart import MARKED
from chroma_snapshots.engine.keys import MANIFESTS, PACKS, REFS, pack_folder
from chroma_snapshots.engine.validation import is_hex64
from chroma_snapshots.errors import InvalidInputError

NAME_FOLDER = frozenset({MANIFESTS, PACKS, REFS})  # what every published name's folder holds
CACHE_NAME_FOLDER = frozenset({"building", "meta", "versions"})  # and a cache's, of a name


def refuse_store_parts(folder: str, entries: list[os.DirEntry[str]]) -> None:
    """InvalidInputError if ``folder`` (listed as ``entries``) shows a store's or a
    cache's folder, or part of one."""
    found = _sign(folder, entries)
    if found is not None:
        what, sign = found
        raise InvalidInputError(
            f"{what} inside the folder being published, at {folder} (it holds {sign}): "
            "publish a folder that does not hold it"
        )


def _sign(folder: str, entries: list[os.DirEntry[str]]) -> tuple[str, str] | None:
    """(what ``folder`` is, the entries that say so), or None."""
    marker = next((e.name for e in entries if e.name in MARKED), None)
    if marker is not None:
        return f"{MARKED[marker]} is", marker
    for kinds, what in ((NAME_FOLDER, "a store's"), (CACHE_NAME_FOLDER, "a cache's")):
        named = [e for e in entries if e.name in kinds]
        if len(named) == len(kinds) and all(e.is_dir(follow_symlinks=False) for e in named):
            return f"{what} name folder is", ", ".join(sorted(kinds))
    prefix = os.path.basename(folder)
    if len(prefix) != len(pack_folder("0" * 64)):  # most folders: no entry is looked at
        return None
    packs = (e for e in entries if pack_folder(e.name) == prefix and is_hex64(e.name))
    pack = next((e.name for e in packs if e.is_file(follow_symlinks=False)), None)
    return None if pack is None else ("a store's packs are", pack)
