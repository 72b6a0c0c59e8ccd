"""A process that keeps upserting into a chroma database (the concurrent writer in tests).

Prints "writing" once its first batch is in, so a test can wait for that instead of sleeping."""

from __future__ import annotations

import random
import sys
from typing import Any, cast

import chromadb

from chroma_snapshots.chroma import client_settings

if __name__ == "__main__":
    client = chromadb.PersistentClient(path=sys.argv[1], settings=client_settings())
    col = client.get_or_create_collection("receipts", embedding_function=None)
    rng = random.Random(1)
    batch = 0
    while True:
        ids = [f"w{batch}-{j}" for j in range(200)]
        col.upsert(
            ids=ids,
            embeddings=cast(Any, [[rng.random() for _ in range(32)] for _ in ids]),
            documents=[f"doc {x} " * 20 for x in ids],
        )
        if batch == 0:
            print("writing", flush=True)
        batch += 1
