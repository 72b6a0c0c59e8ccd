"""Building real chroma databases offline (explicit embeddings, no model downloads)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import chromadb

from chroma_snapshots.chroma import client_settings, close_client


def vectors(n: int, dim: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.random() for _ in range(dim)] for _ in range(n)]


def build(path: Path, collections: dict[str, int], *, dim: int = 32, seed: int = 0) -> Any:
    """A PersistentClient at ``path`` holding ``collections`` (name -> record count)."""
    client = chromadb.PersistentClient(path=str(path), settings=client_settings())
    for i, (name, count) in enumerate(collections.items()):
        col = client.get_or_create_collection(name, embedding_function=None)
        for lo in range(0, count, 2000):
            ids = [f"{name}-{j}" for j in range(lo, min(lo + 2000, count))]
            col.add(
                ids=ids,
                embeddings=cast(Any, vectors(len(ids), dim, seed + i * 100000 + lo)),
                documents=[f"document {x}" for x in ids],
                metadatas=[{"n": 1}] * len(ids),
            )
    return client


def counts(client: Any) -> dict[str, int]:
    return {c.name: c.count() for c in client.list_collections()}


def query_ids(client: Any, name: str, probes: list[list[float]]) -> list[list[str]]:
    res = client.get_collection(name).query(
        query_embeddings=cast(Any, probes), n_results=5, include=[]
    )
    return [list(r) for r in res["ids"]]


__all__ = ["build", "close_client", "counts", "query_ids", "vectors"]
