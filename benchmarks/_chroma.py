"""Real chroma databases for the benchmarks, built offline with explicit embeddings."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import chromadb

from chroma_snapshots.chroma import client_settings, close_client


def add(path: Path, n: int, dim: int, seed: int, threshold: int | None = None) -> None:
    """Add ``n`` receipts (ids ``s{seed}-{i}``) to the collection "receipts" at ``path``;
    ``threshold`` sets chroma's HNSW sync_threshold when the collection is created."""
    rng = random.Random(seed)
    client = chromadb.PersistentClient(path=str(path), settings=client_settings())
    config = cast(Any, {"hnsw": {"sync_threshold": threshold}}) if threshold else None
    col = client.get_or_create_collection("receipts", embedding_function=None, configuration=config)
    for lo in range(0, n, 5000):
        ids = [f"s{seed}-{i}" for i in range(lo, min(lo + 5000, n))]
        col.add(
            ids=ids,
            embeddings=cast(Any, [[rng.random() for _ in range(dim)] for _ in ids]),
            documents=[f"receipt {i} merchant {rng.randrange(500)}" for i in ids],
        )
    close_client(client)
