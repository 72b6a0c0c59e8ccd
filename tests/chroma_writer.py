"""A process that keeps upserting into a chroma database (the concurrent writer in tests).

Prints "writing" once its first batch is in, so a test can wait for that instead of sleeping.
``argv[2]``, if given: after that many batches the ids repeat (upserts then rewrite records
in place), so the database stops growing; a validation reads every record back, and a
database that grew all through a test made each one slower than the last."""

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
    cycle = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    batch = 0
    while True:
        ids = [f"w{batch % cycle if cycle else batch}-{j}" for j in range(200)]
        col.upsert(
            ids=ids,
            embeddings=cast(Any, [[rng.random() for _ in range(32)] for _ in ids]),
            documents=[f"doc {x} " * 20 for x in ids],
        )
        if batch == 0:
            print("writing", flush=True)
        batch += 1
