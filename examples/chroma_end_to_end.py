"""Build a small chroma database offline, publish it, open it from another process, compact.

usage: python examples/chroma_end_to_end.py [STORE_URL]   (default: a temporary file:// store)
Needs the chroma extra: pip install 'chroma-snapshots[chroma]'.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
from typing import Any, cast

import chromadb

from chroma_snapshots import open_store
from chroma_snapshots.chroma import client_settings, open_client, publish_client
from chroma_snapshots.compaction import Delta, Record, compact

READER = """
import sys
from chroma_snapshots import open_store
from chroma_snapshots.chroma import open_client
with open_client(open_store(sys.argv[1], cache_dir=sys.argv[2]), "receipts") as client:
    col = client.get_collection("receipts")
    hit = col.query(query_embeddings=[[0.5] * 8], n_results=3, include=["documents"])
    print(f"reader process: {col.count()} records; nearest: {hit['ids'][0]}")
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = sys.argv[1] if len(sys.argv) > 1 else f"file://{tmp}/store"
        store = open_store(url)
        rng = random.Random(0)
        client = chromadb.PersistentClient(path=f"{tmp}/db", settings=client_settings())
        col = client.get_or_create_collection("receipts", embedding_function=None)
        ids = [f"receipt-{i}" for i in range(500)]
        col.add(
            ids=ids,
            embeddings=cast(Any, [[rng.random() for _ in range(8)] for _ in ids]),
            documents=[f"receipt {i}" for i in range(500)],
        )
        info = publish_client(store, "receipts", client)  # closes the client, validates a copy
        print(f"published {info.version}: {info.metadata['chroma']}")
        subprocess.run([sys.executable, "-c", READER, url, f"{tmp}/cache"], check=True)
        delta = Delta(
            "batch-1", "receipts", tuple(Record(f"new-{i}", (0.5,) * 8) for i in range(3))
        )
        result = compact(store, "receipts", [delta])
        print(f"compacted {result.applied} into {result.info.version if result.info else '-'}")
        print(f"replaying it: skipped {compact(store, 'receipts', [delta]).skipped}")
        with open_client(store, "receipts") as reader:
            print(f"now {reader.get_collection('receipts').count()} records")


if __name__ == "__main__":
    main()
