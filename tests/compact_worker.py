"""A compactor process: applies its own deltas one by one (the concurrency test).

usage: compact_worker.py ENDPOINT BUCKET WRITER COUNT LOCK_TABLE|- [--steps]
--steps: announce each backend call and wait for the parent's go (kill_points.py).
"""

from __future__ import annotations

import sys

from kill_points import marked

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.compaction import Delta, Record, compact
from chroma_snapshots.locking import DynamoDBLeaseLock
from chroma_snapshots.testing import MotoServer

if __name__ == "__main__":
    endpoint, bucket, writer, count, table = sys.argv[1:6]
    backend = S3Backend(bucket, "snaps", settings=S3Settings(endpoint_url=endpoint))
    store = RemoteStore(marked(backend))
    lock = None
    if table != "-":
        server = MotoServer()
        server.endpoint_url = endpoint
        lock = DynamoDBLeaseLock(server.client_for("dynamodb"), table, "compactor", ttl=60)
    for j in range(int(count)):
        recs = tuple(
            Record(f"w{writer}-d{j}-r{k}", (float(writer), float(j), float(k), 1.0))
            for k in range(10)
        )
        result = compact(
            store, "db", [Delta(f"w{writer}-d{j}", "receipts", recs)], lock=lock, max_retries=50
        )
        print(f"delta {j}: attempts {result.attempts}", flush=True)
