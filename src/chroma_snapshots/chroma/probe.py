"""Chroma's half of :func:`chroma_snapshots.chroma.validate`, run in a child process.

chroma's native code can crash the process that opens a damaged database (SIGSEGV on a
vector index whose neighbour ids point past its end, SIGABRT on a torn header). That
must be an ``IntegrityError`` for the caller, not the caller's death, so chroma opens the
folder in a Python of its own (:func:`chroma_snapshots.engine.child.run_once`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import chromadb

from chroma_snapshots.chroma.client import client_settings, close_client
from chroma_snapshots.engine.child import reply
from chroma_snapshots.errors import IntegrityError


def main() -> None:
    """The child: open ``sys.argv[1]`` with chroma, count and probe the collections named
    in ``sys.argv[2]`` (JSON), reply ``{"counts": ...}`` or ``{"error": ...}``."""
    path, names = Path(sys.argv[1]), json.loads(sys.argv[2])
    try:
        reply({"counts": _count_and_probe(path, names)})
    except IntegrityError as e:
        reply({"error": str(e)})
    except Exception as e:  # chroma's own errors, whatever their type: the folder is bad
        reply({"error": f"chroma failed reading it: {e}"})


def _count_and_probe(path: Path, names: list[str]) -> dict[str, int]:
    try:
        client = chromadb.PersistentClient(path=str(path), settings=client_settings())
    except Exception as e:
        raise IntegrityError(f"chroma cannot open it: {e}") from e
    try:
        counts = {}
        for name in names:
            col = client.get_collection(name)
            counts[name] = col.count()
            _probe_index(col, name)
        return counts
    finally:
        close_client(client)


def _probe_index(col: Any, name: str) -> None:
    """Query the vector index with a stored vector: it must find that record."""
    sample = col.get(limit=1, include=["embeddings"])
    if not sample["ids"]:
        return
    hit = col.query(query_embeddings=[sample["embeddings"][0]], n_results=1, include=[])
    if not hit["ids"] or not hit["ids"][0]:
        raise IntegrityError(f"collection {name}: the vector index returned nothing")
