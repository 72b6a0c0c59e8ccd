"""Chroma's half of :func:`chroma_snapshots.chroma.validate`, run in a child process.

chroma's native code can crash the process that opens a damaged database (SIGSEGV on a
vector index whose neighbour ids point past its end, SIGABRT on a torn header). That
must be an ``IntegrityError`` for the caller, not the caller's death, so chroma opens the
folder in a Python of its own (:func:`chroma_snapshots.engine.child.run_once`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import chromadb
import numpy

from chroma_snapshots.chroma.client import client_settings, close_client
from chroma_snapshots.engine.child import read_request, reply
from chroma_snapshots.errors import IntegrityError

_PAGE = 5000  # records read back at once: bounded memory whatever the collection's size


def main() -> None:
    """The child: open the folder the request names with chroma, count and probe the
    collections it names, reply ``{"counts": ...}`` or ``{"error": ...}``."""
    path, names = read_request()
    try:
        reply({"counts": _count_and_probe(Path(path), names)})
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
            _read_every_embedding(col, name, counts[name])
            _probe_index(col, name)
        return counts
    finally:
        close_client(client)


def _read_every_embedding(col: Any, name: str, count: int) -> None:
    """Every record's embedding, read back from the vector segment in pages: a segment
    cut short, or a record whose label points nowhere, fails here (chroma raises), and a
    vector that is not finite is damage chroma would have refused to store."""
    seen = 0
    while seen < count:
        page = col.get(offset=seen, limit=_PAGE, include=["embeddings"])
        vectors = page["embeddings"]
        if not page["ids"] or vectors is None or len(vectors) != len(page["ids"]):
            raise IntegrityError(f"collection {name}: records {seen}.. have no embedding")
        if not numpy.isfinite(numpy.asarray(vectors, dtype=numpy.float64)).all():
            raise IntegrityError(f"collection {name}: an embedding is not finite (NaN, inf)")
        seen += len(page["ids"])


def _probe_index(col: Any, name: str) -> None:
    """Query the vector index with a stored vector: it must find that record."""
    sample = col.get(limit=1, include=["embeddings"])
    if not sample["ids"]:
        return
    hit = col.query(query_embeddings=[sample["embeddings"][0]], n_results=1, include=[])
    if not hit["ids"] or not hit["ids"][0]:
        raise IntegrityError(f"collection {name}: the vector index returned nothing")
